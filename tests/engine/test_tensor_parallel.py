"""Tensor parallel over a Mesh of 8 host CPU devices, and two local processes via jax.distributed."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from ferry.engine import sharding as tp
from ferry.engine.config import EngineConfig
from ferry.engine.sampling_params import SamplingParams
from ferry.models.naive import naive_logits
from ferry.models.random_weights import random_bundle

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("hq,hkv", [(9, 3), (32, 8), (4, 2), (6, 1), (12, 12), (14, 2)])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_head_layout_covers_every_query_head_once(hq, hkv, n):
    lay = tp.head_layout(hq, hkv, n)
    assert lay.num_kv_heads % n == 0 and lay.num_heads % lay.num_kv_heads == 0
    g_new, g_old = lay.num_heads // lay.num_kv_heads, hq // hkv
    real = [q for q in lay.q_src if q >= 0]
    assert sorted(real) == list(range(hq))                          # each original head exactly once
    for i, q in enumerate(lay.q_src):
        if q >= 0:                                                  # attached to a copy of its own KV head
            assert lay.kv_src[i // g_new] == q // g_old
    if hkv % n == 0:
        assert lay.is_identity


@pytest.mark.parametrize("n", [2, 4, 8])
def test_relayout_computes_the_same_function(n):
    b = random_bundle("random:tiny-gqa3", seed=1)
    lay = tp.head_layout(b.config.num_heads, b.config.num_kv_heads, n)
    assert not lay.is_identity
    ids = list(np.random.default_rng(n).integers(3, 500, size=11))
    ref = np.asarray(naive_logits(b.config, b.params, ids))
    got = np.asarray(naive_logits(tp.padded_config(b.config, lay), tp.relayout_params(b.params, b.config, lay), ids))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def _run(model, n, prompts, bundle=None, **kw):
    from ferry.engine.llm_engine import LLMEngine
    cfg = EngineConfig(model=model, tensor_parallel=n, max_batch=4, max_model_len=128, max_prefill_chunk=32,
                       num_pages=48, num_host_pages=16, warmup_progress=False, strict_compile_guard=True,
                       compile_cache_dir=None, **kw)
    eng = LLMEngine(cfg, bundle=bundle)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = list(o.token_ids)
    assert eng.guard.violations == 0
    assert eng.stats()["device_pages_used"] == 0
    return eng, [outs[str(i)] for i in range(len(prompts))]


@pytest.mark.skipif(jax.device_count() < 4, reason="needs --xla_force_host_platform_device_count >= 4")
def test_tp_random_model_needing_head_replication_matches_single_device():
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, size=n).tolist() for n in (3, 17, 45)]
    _, base = _run("random:tiny-gqa3", 1, prompts)
    assert len({tuple(t) for t in base}) == 3                      # non-degenerate outputs
    for n in (2, 4):
        eng, got = _run("random:tiny-gqa3", n, prompts)
        assert got == base, f"TP={n}"
        shard_heads = {s.data.shape[1] for s in eng.kv.k.addressable_shards}
        assert shard_heads == {eng.compute_config.num_kv_heads // n}     # KV pages split by head


@pytest.mark.skipif(jax.device_count() < 4, reason="needs --xla_force_host_platform_device_count >= 4")
def test_tp_default_model_matches_single_device(default_bundle):
    tok = default_bundle.tokenizer
    prompts = [tok.encode(t) for t in ("The capital of France is", "def fibonacci(n):",
                                       "Once upon a time, in a small village,")]
    _, base = _run(None, 1, prompts, bundle=default_bundle)
    for n in (2, 4):
        _, got = _run(None, n, prompts, bundle=default_bundle)
        assert got == base, f"TP={n}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(port, pid, nproc, n, *extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "engine", "multihost_worker.py"), str(port),
                             str(pid), str(nproc), str(n), "random:tiny-gqa3", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def _result(proc) -> dict:
    out, _ = proc.communicate(timeout=600)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-3000:]
    return json.loads(lines[-1][7:])


def test_two_processes_give_the_same_tokens_as_one():
    port = _free_port()
    procs = [_worker(port, i, 2, 2) for i in range(2)]          # TP=2 across two processes
    results = [_result(p) for p in procs]
    single = _result(_worker(_free_port(), 0, 1, 1))
    for r in results:
        assert r["greedy"] == single["greedy"]
        assert r["seeded"] == single["seeded"]
        assert r["violations"] == 0


def test_diverged_plans_fail_on_every_process():
    """Process 1 plans differently (max_batch 1 against the leader's 4): both processes raise
    ``PlanDivergence`` at the first step, before dispatching it, instead of blocking in its
    collectives. The same workers without the fault agree (test above: the positive control)."""
    port = _free_port()
    procs = [_worker(port, i, 2, 2, "diverge") for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)                    # bounded: a hang fails here
        assert p.returncode == 3 and "DIVERGED multi-host divergence before dispatch" in out, out[-3000:]


def test_idle_leader_owes_followers_a_heartbeat(monkeypatch):
    """An idle multi-host leader reports work once HEARTBEAT_S passed, so the serving loop steps
    (and syncs) instead of leaving followers blocked inside a collective."""
    from ferry.engine import distributed

    class Idle:
        def has_unfinished_requests(self):
            return False

    eng = distributed.MultiHostEngine.__new__(distributed.MultiHostEngine)
    eng.engine, eng.is_leader, eng._commands = Idle(), True, []
    now = [100.0]
    monkeypatch.setattr(distributed.time, "monotonic", lambda: now[0])
    eng._last_sync = 100.0
    assert not eng.has_unfinished_requests()
    now[0] += distributed.HEARTBEAT_S + 0.1
    assert eng.has_unfinished_requests()
    eng.is_leader = False                                  # followers never initiate
    assert not eng.has_unfinished_requests()

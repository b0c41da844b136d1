"""Host cost per decode step: the engine loop against the device-only floor of the same program.

usage: python scripts/bench_overhead.py [--batches 1 16 64] [--decode-steps 1 8] [--tokens 256]
           [--baseline-rev REV] [--output benchmarks/results/overhead_cpu_2core.json]

Model ``random:tiny`` (2 layers, hidden 64): the device does almost nothing, so the time of a
step is the engine's own (scheduling, slot updates, dispatch, reading tokens, detokenizing, stop
checks). For each decode-steps value K and batch B: B greedy requests decode ``--tokens`` tokens
each (EOS ignored); after the prefills, the wall time of ``engine.step()`` calls divided by the
tokens each row produced is the **engine ms per step** (one token for every row). The **floor**
is the same decode program called back to back on the same state with no host work in between,
per iteration. engine - floor is the host cost per step.

``--baseline-rev``: also measures the engine at that git revision (before the device-resident
loop: one dispatch and one host round trip per token) in a subprocess, side by side in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import machine, write_json  # noqa: E402

_BASELINE = r'''
import json, sys, time
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
batches, tokens = json.loads(sys.argv[1]), int(sys.argv[2])
eng = LLMEngine(EngineConfig(model="random:tiny", max_batch=max(batches), max_model_len=tokens + 64,
                             warmup_progress=False, compile_cache_dir=None))
res = {}
for B in batches:
    for i in range(B):
        eng.add_request(f"b{B}-{i}", [1, 2, 3], SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    while any(len(r.out_ids) == 0 for r in eng._requests.values()):
        eng.step()
    n0 = min(len(r.out_ids) for r in eng._requests.values())
    t = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    res[B] = (time.perf_counter() - t) / (tokens - n0) * 1e3
print(json.dumps(res))
'''


def measure(K: int, batches: list[int], tokens: int, cache_dir: str) -> dict:
    import jax
    import numpy as np

    from ferry.engine.config import EngineConfig
    from ferry.engine.llm_engine import LLMEngine
    from ferry.engine.sampling import SamplingRow
    from ferry.engine.sampling_params import SamplingParams
    from ferry.engine.slots import SlotRow

    eng = LLMEngine(EngineConfig(model="random:tiny", max_batch=max(batches), max_model_len=tokens + 64,
                                 decode_steps=K, warmup_progress=False, compile_cache_dir=cache_dir,
                                 strict_compile_guard=True))
    out = {}
    for B in batches:
        rids = [f"k{K}-b{B}-{i}" for i in range(B)]
        for rid in rids:
            eng.add_request(rid, [1, 2, 3], SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
        while any(len(eng._requests[r].out_ids) == 0 for r in rids):       # prefills done
            eng.step()
        n0 = min(len(eng._requests[r].out_ids) for r in rids)
        steps, t = 0, time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
            steps += 1
        engine_ms = (time.perf_counter() - t) / (tokens - n0) * 1e3
        # device-only floor: the same decode program back to back on live slots, no host work between
        runner = eng.runner
        pages = list(range(1, 2 + (16 + tokens) // eng.config.page_size))
        never_stop = SamplingRow(SamplingParams(temperature=0, max_tokens=10**6), 0, 0)
        slots = [eng.slots.bind(f"floor{i}", set()) for i in range(B)]
        for i, s in enumerate(slots):
            eng.slots.write(s, SlotRow(f"floor{i}", 5, 8, pages, never_stop), None)
        runner.apply_updates(*eng.slots.take_updates())
        reps = (tokens - 8) // K                          # the same contexts as the engine run: 8 .. tokens
        jax.block_until_ready(runner.decode(slots, 8, 1).tokens)
        t = time.perf_counter()
        for i in range(reps):
            o = runner.decode(slots, 9 + i * K, K)
        jax.block_until_ready(o.tokens)
        floor_ms = (time.perf_counter() - t) / (reps * K) * 1e3
        for i in range(B):
            eng.slots.release(f"floor{i}")
        out[B] = {"engine_ms_per_step": round(engine_ms, 4), "device_floor_ms_per_step": round(floor_ms, 4),
                  "host_ms_per_step": round(engine_ms - floor_ms, 4), "dispatches": steps}
        print(f"K={K:2d} B={B:3d}: engine {engine_ms:7.3f} ms/step  floor {floor_ms:7.3f}  "
              f"host {engine_ms - floor_ms:7.3f}  ({steps} dispatches)", flush=True)
    assert eng.guard.violations == 0 and np.isfinite(list(out[B].values())[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--decode-steps", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=256, help="tokens each request decodes")
    ap.add_argument("--baseline-rev", default=None, help="git revision of the engine to compare with")
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    if min(a.batches) < 1 or min(a.decode_steps) < 1 or a.tokens < 16:
        ap.error("--batches and --decode-steps must be >= 1, --tokens >= 16")
    cache = tempfile.mkdtemp(prefix="ferry-bench-")
    res = {"command": "python scripts/bench_overhead.py " + " ".join(sys.argv[1:]),
           "machine": machine(),
           "model": "random:tiny", "tokens_per_request": a.tokens, "results": {}}
    for K in a.decode_steps:
        res["results"][f"decode_steps={K}"] = measure(K, a.batches, a.tokens, cache)
    if a.baseline_rev:
        from baseline import worktree
        with worktree(a.baseline_rev) as wt:
            r = subprocess.run([sys.executable, "-c", _BASELINE, json.dumps(a.batches), str(a.tokens)],
                               cwd=wt, env=dict(os.environ, PYTHONPATH=wt), capture_output=True, text=True,
                               timeout=3600)
            if r.returncode != 0:
                raise RuntimeError(r.stderr[-2000:])
            base = {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
        res["baseline"] = {"rev": a.baseline_rev, "engine_ms_per_step": base}
        for B, ms in base.items():
            best = min(v[B]["engine_ms_per_step"] for v in res["results"].values())
            print(f"baseline {a.baseline_rev} B={B:3d}: {ms:7.3f} ms/step  -> now {best:7.3f} ({ms / best:.1f}x)")
    write_json(a.output, res)


if __name__ == "__main__":
    main()

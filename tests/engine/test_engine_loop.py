"""The engine loop: multi-step decode on device, device-resident slots, lazy warm-up.

All engines run ``random:tiny`` (2 layers) and share a persistent compilation cache in a
temporary directory.
"""
import pytest

from ferry.engine.config import EngineConfig
from ferry.engine.llm_engine import LLMEngine
from ferry.engine.sampling_params import SamplingParams


def _cfg(cache_dir, **kw):
    base = dict(model="random:tiny", max_batch=4, max_model_len=256, max_prefill_chunk=64, num_pages=64,
                num_host_pages=16, strict_compile_guard=True, warmup_progress=False, compile_cache_dir=str(cache_dir),
                model_cache_dir=None)
    base.update(kw)
    return EngineConfig(**base)


def _requests():
    return [
        ("greedy", list(range(20, 60)), SamplingParams(temperature=0, max_tokens=37, ignore_eos=True)),
        ("seeded", [5, 6, 7], SamplingParams(temperature=0.9, top_p=0.8, seed=11, max_tokens=29, ignore_eos=True)),
        ("penalty", [9] * 12, SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=0.4,
                                             presence_penalty=0.2, max_tokens=25, ignore_eos=True)),
        ("logprobs", [3, 1, 4, 1, 5], SamplingParams(temperature=0, logprobs=3, max_tokens=9, ignore_eos=True)),
    ]


def _run(eng, reqs, abort_after=None, abort_in_flight=None):
    for rid, ids, p in reqs:
        eng.add_request(rid, ids, p)
    out, steps = {}, 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o
        steps += 1
        if abort_after and steps == abort_after[1]:
            eng.abort_request(abort_after[0])
        if abort_in_flight and abort_in_flight in eng._requests and eng._inflight is not None:
            if any(w.request_id == abort_in_flight for w in eng._inflight.items):   # tokens not read yet
                eng.abort_request(abort_in_flight)
        eng.scheduler.check_invariants()
    s = eng.stats()
    assert s["device_pages_used"] == 0 and s["host_pages_used"] == 0 and eng.guard.violations == 0
    assert not eng.slots.slot_of                            # every slot released
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ferry-cache")


@pytest.fixture(scope="module")
def single_step(cache_dir):
    eng = LLMEngine(_cfg(cache_dir, decode_steps=1))
    return _run(eng, _requests()), eng.stats()


def test_multistep_decode_matches_single_step(cache_dir, single_step):
    ref, s1 = single_step
    eng = LLMEngine(_cfg(cache_dir, decode_steps=8))
    got = _run(eng, _requests())
    s8 = eng.stats()
    for rid in ref:
        assert got[rid].token_ids == ref[rid].token_ids, rid
        assert got[rid].finish_reason == ref[rid].finish_reason == "length"
        assert len(got[rid].token_ids) == {r: p.max_tokens for r, _, p in _requests()}[rid]
    assert [t.token_id for t in got["logprobs"].logprobs] == list(got["logprobs"].token_ids)
    for a, b in zip(got["logprobs"].logprobs, ref["logprobs"].logprobs):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, rel=1e-5)
        assert [i for i, _ in a.top] == [i for i, _ in b.top]
    assert s1["decode_iterations"] == s1["decode_dispatches"]            # K = 1: one token per dispatch
    assert s8["decode_iterations"] > 4 * s8["decode_dispatches"]          # K = 8 really used
    assert s8["decode_dispatches"] < s1["decode_dispatches"] / 3


def test_stop_on_device_ends_a_row_early_inside_a_dispatch(cache_dir, single_step):
    """A stop id hit in the middle of a K-step dispatch: the row stops there, the others go on."""
    ref, _ = single_step
    stop = ref["greedy"].token_ids[10]
    first = ref["greedy"].token_ids.index(stop)
    eng = LLMEngine(_cfg(cache_dir, decode_steps=8))
    reqs = _requests()
    reqs[0] = ("greedy", reqs[0][1], SamplingParams(temperature=0, max_tokens=37, ignore_eos=True,
                                                    stop_token_ids=[stop]))
    got = _run(eng, reqs)
    assert got["greedy"].finish_reason == "stop"
    assert list(got["greedy"].token_ids) == list(ref["greedy"].token_ids[:first + 1])
    for rid in ("seeded", "penalty", "logprobs"):
        assert got[rid].token_ids == ref[rid].token_ids, rid


def test_steady_decode_uploads_only_rows_that_change(cache_dir):
    """Host -> device slot rows: one when a request joins, one per new page; none per token."""
    eng = LLMEngine(_cfg(cache_dir, decode_steps=8))
    out = _run(eng, [("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))])
    s = eng.stats()
    pages = -(-(3 + 200) // eng.config.page_size)
    assert len(out["a"].token_ids) == 200
    assert 1 <= s["slot_rows_uploaded"] <= 1 + pages < 200 // 8
    # positive control: the counter does count, one row per join
    eng2 = LLMEngine(_cfg(cache_dir, decode_steps=8))
    _run(eng2, [(f"r{i}", [i + 1], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)) for i in range(3)])
    assert eng2.stats()["slot_rows_uploaded"] >= 3


def test_abort_between_dispatches_frees_everything_and_others_continue(cache_dir, single_step):
    ref, _ = single_step
    eng = LLMEngine(_cfg(cache_dir, decode_steps=8))
    got = _run(eng, _requests(), abort_after=("seeded", 3))
    assert got["seeded"].finish_reason == "abort"
    for rid in ("greedy", "penalty", "logprobs"):
        assert got[rid].token_ids == ref[rid].token_ids, rid


def test_lazy_warmup_compiles_only_what_runs(tmp_path, single_step):
    ref, _ = single_step
    eng = LLMEngine(_cfg(tmp_path, decode_steps=1, warmup="lazy", strict_compile_guard=False))
    assert sum(len(p.executables) for p in eng.runner.programs.values()) == 0
    got = _run(eng, [r for r in _requests() if r[0] == "greedy"])
    built = sum(len(p.executables) for p in eng.runner.programs.values())
    assert 0 < built < len(eng.runner.shapes())
    assert got["greedy"].token_ids == ref["greedy"].token_ids


def test_abort_between_dispatch_and_read(cache_dir, single_step):
    """Dispatch-ahead: a request aborted while a dispatch holding it is in flight (its tokens not
    read yet) ends as "abort"; its pages and slot are freed; the others are unaffected."""
    ref, _ = single_step
    eng = LLMEngine(_cfg(cache_dir, decode_steps=8))
    got = _run(eng, _requests(), abort_in_flight="penalty")
    assert got["penalty"].finish_reason == "abort"
    assert len(got["penalty"].token_ids) < 25
    for rid in ("greedy", "seeded", "logprobs"):
        assert got[rid].token_ids == ref[rid].token_ids, rid


def test_dispatch_ahead_reads_one_step_behind_in_order(cache_dir, single_step):
    """With dispatch-ahead on, the engine returns a dispatch's tokens one step later; streamed
    deltas arrive in order and concatenate to the final output; off, the same tokens."""
    ref, _ = single_step
    for ahead in (True, False):
        eng = LLMEngine(_cfg(cache_dir, decode_steps=8, dispatch_ahead=ahead))
        for rid, ids, p in _requests():
            eng.add_request(rid, ids, p)
        seen = {rid: [] for rid, _, _ in _requests()}
        behind = 0
        while eng.has_unfinished_requests():
            outs = eng.step()
            behind += eng._inflight is not None
            for o in outs:
                assert list(o.token_ids[:len(seen[o.request_id])]) == seen[o.request_id]
                seen[o.request_id].extend(o.delta_token_ids)
                assert list(o.token_ids) == seen[o.request_id]
        assert (behind > 0) == ahead
        assert {k: tuple(v) for k, v in seen.items()} == {k: v.token_ids for k, v in ref.items()}


def test_serve_programs_switch_context_on_device_like_one_bucket_programs(tmp_path):
    """Context is not a compiled axis: a fully warmed engine (``ferry serve``) builds decode[B, C_max]
    and step[T, C_max] only, which pick the context bucket on device; a lazy engine (``ferry generate``)
    builds the smallest bucket that holds its rows. The lazy engine here attends over its program's
    whole bucket (no switch: the engine before this change). Rows crossing the decode buckets 64 and
    256 and reaching the step bucket 1024 get the same greedy tokens from both."""
    reqs = [(f"r{n}", [3 + (7 * i) % 200 for i in range(n)], SamplingParams(temperature=0, max_tokens=m,
                                                                            ignore_eos=True))
            for n, m in ((5, 70), (100, 200), (300, 30))]
    kw = dict(max_model_len=1024, num_pages=128)
    full = LLMEngine(_cfg(tmp_path, **kw))
    assert full.config.buckets().decode_context == (64, 256, 1024)
    got = {rid: o for r in reqs for rid, o in _run(full, [r]).items()}          # one at a time: batch 1
    assert set(full.runner.programs["decode"].executables) == {(1, 1024), (4, 1024)}
    assert {key[1] for key in full.runner.programs["step"].executables} == {1024}
    lazy = LLMEngine(_cfg(tmp_path, warmup="lazy", strict_compile_guard=False, **kw))
    lazy.runner._branches = lambda table, C: (C // lazy.runner.page_size,)     # one branch: the whole bucket
    ref = {rid: o for r in reqs for rid, o in _run(lazy, [r]).items()}
    assert {(1, 64), (1, 256), (1, 1024)} <= set(lazy.runner.programs["decode"].executables)
    for rid, _, p in reqs:
        assert len(got[rid].token_ids) == p.max_tokens and got[rid].token_ids == ref[rid].token_ids, rid

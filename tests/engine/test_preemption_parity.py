"""A preempted, swapped or recomputed request produces exactly the tokens it would uninterrupted.

The engine runs ``random:tiny`` with ample KV pages under FCFS (never interrupted: the reference),
then with a tiny device cache (24 pages of 8 tokens for 4 rows of up to ~100 tokens) and a tiny host
swap space, so jobs are preempted, swapped out and in, and dropped for recompute. Greedy and seeded
sampling rows are mixed. The reference decodes up to 8 tokens per dispatch (multi-step), the
interrupted runs one or four. Scheduler decisions are deterministic (cost-model service time; the
starvation guard is off), so the stats assertions cannot pass or fail by timing.
"""
import numpy as np
import pytest

from ferry.engine.config import EngineConfig
from ferry.engine.llm_engine import LLMEngine
from ferry.engine.sampling_params import SamplingParams


def _jobs():
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(7):
        ids = rng.integers(3, 500, size=int(rng.integers(5, 40))).tolist()
        p = (SamplingParams(temperature=0, max_tokens=int(rng.integers(20, 60)), ignore_eos=True) if i % 2 == 0 else
             SamplingParams(temperature=0.9, top_p=0.9, seed=int(rng.integers(1 << 30)),
                            max_tokens=int(rng.integers(20, 60)), ignore_eos=True))
        jobs.append((3 * i, f"r{i}", ids, p))          # (arrival step, id, prompt ids, params)
    return jobs


def _run(scheduler, num_pages, host_pages, jobs, decode_steps=1):
    eng = LLMEngine(EngineConfig(model="random:tiny", max_batch=4, max_model_len=128, max_prefill_chunk=32,
                                 page_size=8, num_pages=num_pages, num_host_pages=host_pages, scheduler=scheduler,
                                 decode_steps=decode_steps,
                                 strict_compile_guard=True, warmup_progress=False, compile_cache_dir=None,
                                 mlfq_base_quantum=0.05, mlfq_starve_limit=1e6))
    out, step, pending = {}, 0, list(jobs)
    while pending or eng.has_unfinished_requests():
        while pending and pending[0][0] <= step:            # staggered arrivals, in steps
            _, rid, ids, params = pending.pop(0)
            eng.add_request(rid, ids, params)
        for o in eng.step():
            if o.finished:
                out[o.request_id] = list(o.token_ids)
        step += 1
        eng.scheduler.check_invariants()
        if eng.last_plan is not None:
            eng.scheduler.check_plan(eng.last_plan)
            for w in eng.last_plan.work:                     # KV on device before any work of a job
                assert not eng.scheduler.jobs.get(w.request_id) or not eng.scheduler.jobs[w.request_id].host_pages
    s = eng.stats()
    assert s["device_pages_used"] == 0 and s["host_pages_used"] == 0 and eng.guard.violations == 0
    return out, s


@pytest.fixture(scope="module")
def reference():
    jobs = _jobs()
    ref, s = _run("fcfs", 200, 0, jobs, decode_steps=8)     # ample pages: never interrupted; multi-step decode
    assert s["preemptions"] == 0 and s["swap_out_pages"] == 0 and s["recomputes"] == 0
    assert len(ref) == len(jobs) and all(len(v) == p.max_tokens for _, k, _, p in jobs for v in [ref[k]])
    return jobs, ref


def test_mlfq_preempted_swapped_recomputed_requests_match_uninterrupted(reference):
    jobs, ref = reference
    got, s = _run("mlfq", 25, 10, jobs)
    assert s["preemptions"] > 0 and s["swap_out_pages"] > 0 and s["swap_in_pages"] > 0, s
    assert s["recomputes"] > 0 and s["demotions"] > 0, s
    assert got == ref


def test_fcfs_under_memory_pressure_matches_uninterrupted(reference):
    jobs, ref = reference
    got, s = _run("fcfs", 25, 4, jobs)                      # later arrivals lose their KV to earlier ones
    assert s["preemptions"] > 0 and s["swap_out_pages"] + s["recomputes"] > 0, s
    assert got == ref


def test_multistep_decode_under_memory_pressure_matches_uninterrupted(reference):
    """Multi-step dispatches (K=4) mixed with preemption: pages for K tokens are taken ahead,
    rows stop early on device, and the tokens still equal the uninterrupted run's."""
    jobs, ref = reference
    got, s = _run("fcfs", 25, 4, jobs, decode_steps=4)
    assert s["preemptions"] > 0 and s["decode_iterations"] > s["decode_dispatches"] > 0, s
    assert got == ref

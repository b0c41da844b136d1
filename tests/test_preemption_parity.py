"""A preempted, swapped or recomputed request produces exactly the tokens it would uninterrupted."""
import numpy as np

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def _run(scheduler, num_pages, host_pages, jobs, **kw):
    eng = LLMEngine(EngineConfig(model="random:tiny", max_batch=4, max_model_len=128, max_prefill_chunk=32,
                                 page_size=8, num_pages=num_pages, num_host_pages=host_pages, scheduler=scheduler,
                                 strict_compile_guard=True, warmup_progress=False, compile_cache_dir=None,
                                 mlfq_base_quantum=0.05, **kw))
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
    s = eng.stats()
    assert s["device_pages_used"] == 0 and s["host_pages_used"] == 0 and eng.guard.violations == 0
    return out, s


def test_preempted_swapped_recomputed_requests_match_uninterrupted():
    rng = np.random.default_rng()
    jobs = []
    for i in range(7):
        ids = rng.integers(3, 500, size=int(rng.integers(5, 40))).tolist()
        p = (SamplingParams(temperature=0, max_tokens=int(rng.integers(20, 60)), ignore_eos=True) if i % 2 == 0 else
             SamplingParams(temperature=0.9, top_p=0.9, seed=int(rng.integers(1 << 30)),
                            max_tokens=int(rng.integers(20, 60)), ignore_eos=True))
        jobs.append((3 * i, f"r{i}", ids, p))
    ref, s_ref = _run("fcfs", 200, 0, jobs)                 # ample pages: never interrupted
    assert s_ref["preemptions"] == 0 and s_ref["swap_out_pages"] == 0
    # 24 pages of 8 tokens for 4 rows of up to ~100 tokens, 10 host pages: preemption, swaps and recompute.
    got, s = _run("mlfq", 25, 10, jobs)
    assert s["preemptions"] > 0 and s["swap_out_pages"] > 0 and s["swap_in_pages"] > 0, s
    assert s["recomputes"] > 0, s
    assert got == ref

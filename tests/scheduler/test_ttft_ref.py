"""The prefill-first TTFT reference (scheduler/ttft_ref.py): its order, and that it lowers mean TTFT
where prefills queue on each other (a burst of mixed prompts), with FCFS as the control."""
import numpy as np

from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.request_state import Job
from ferry.scheduler.scheduler import SchedulerConfig
from ferry.scheduler.simulator import simulate
from ferry.scheduler.ttft_ref import PrefillFirst

COST = CostModel(base=0.01, decode_base=0.008, per_prefill_token=1e-4, per_decode_row=4e-5, per_context_token=0.0,
                 per_swap_page=0.0)


def _job(rid, prompt, computed, arrival):
    j = Job(rid, prompt, 100, arrival)
    j.num_computed = computed
    return j


def test_prefills_first_fewest_prompt_tokens_left_first_then_decodes_by_arrival():
    jobs = [_job("decode_old", 10, 12, 0.0), _job("long", 900, 0, 1.0), _job("decode_new", 10, 11, 2.0),
            _job("short", 300, 250, 3.0)]
    assert [j.rid for j in PrefillFirst().order(jobs)] == ["short", "long", "decode_old", "decode_new"]


def test_a_burst_of_mixed_prompts_gets_its_first_tokens_sooner_than_under_fcfs():
    rng = np.random.default_rng()
    prompts = [int(x) for x in rng.integers(1500, 2500, 4)] + [int(x) for x in rng.integers(8, 80, 16)]  # long ones first
    trace = [{"arrival": 0.001 * i, "prompt_len": int(p), "output_len": int(rng.integers(1, 20))}
             for i, p in enumerate(prompts)]
    ttft = {}
    for policy in ("fcfs", "ttft"):
        cfg = SchedulerConfig(max_batch=8, max_tokens_per_step=8 + 256, max_prefill_chunk=256, page_size=16,
                              num_device_pages=2000, num_host_pages=2000, policy=policy, cost_model=COST)
        res, stats = simulate(trace, cfg, check_every=1)
        assert stats["finished"] == 20
        ttft[policy] = float(np.mean([r.ttft for r in res]))
    assert ttft["ttft"] < 0.8 * ttft["fcfs"]

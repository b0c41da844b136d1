"""Scheduler policy and page accounting (pure Python, no JAX)."""
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.mlfq import SkipJoinMLFQ
from ferry.scheduler.request_state import State
from ferry.scheduler.scheduler import Scheduler, SchedulerConfig
from ferry.scheduler.simulator import simulate

COST = CostModel(base=0.01, per_prefill_token=0.001, per_decode_row=0.001, per_context_token=0.0, per_swap_page=0.0)


def _cfg(**kw):
    base = dict(max_batch=4, max_tokens_per_step=64, max_prefill_chunk=32, page_size=4, num_device_pages=65,
                num_host_pages=64, policy="mlfq", cost_model=COST, base_quantum=0.05, starve_limit=5.0)
    base.update(kw)
    return SchedulerConfig(**base)


def _step(s, now, gen_left):
    """One iteration; jobs in gen_left finish when their count hits 0. Returns the plan."""
    plan = s.schedule(now)
    s.check_invariants()
    s.check_plan(plan)
    done = []
    for w in plan.work:
        assert len(s.block_table(w.request_id)) * s.cfg.page_size >= w.start + w.num_tokens
        if w.sample:
            gen_left[w.request_id] -= 1
            if gen_left[w.request_id] == 0:
                done.append(w.request_id)
    s.on_step_done(plan, now, finished=done)
    return plan


def test_skip_join_places_long_prompts_in_lower_queues():
    m = SkipJoinMLFQ(COST, num_queues=5, base_quantum=0.05, quantum_ratio=2.0)
    # prefill work = 0.001 * n; queues hold attained [0, .05), [.05, .15), [.15, .35), [.35, .75), [.75, inf)
    # 30 -> 0.03 (Q0), 80 -> 0.08 (Q1), 300 -> 0.3 (Q2), 10^4 -> last
    assert [m.join_queue(n) for n in (30, 80, 300, 10_000)] == [0, 1, 2, 4]


def test_demotion_after_quantum_and_preemption_order():
    s = Scheduler(_cfg(max_batch=1))
    s.add("long", 8, 100, 0.0)
    gen = {"long": 100}
    now = 0.0
    for _ in range(6):                       # prefill + decodes: uses Q0's quantum (0.05 s)
        _step(s, now, gen)
        now += 0.02
    assert s.jobs["long"].queue >= 1 and s.stats()["demotions"] >= 1
    s.add("short", 8, 2, now)                # joins Q0, above the demoted job
    gen["short"] = 2
    plan = _step(s, now, gen)
    assert [w.request_id for w in plan.work] == ["short"] and plan.preempted == ("long",)
    assert s.jobs["long"].state == State.PREEMPTED and s.jobs["long"].pages    # KV kept on device
    _step(s, now + 0.01, gen)                # short finishes
    plan = _step(s, now + 0.02, gen)
    assert [w.request_id for w in plan.work] == ["long"]


def test_fcfs_runs_in_arrival_order_without_preemption():
    s = Scheduler(_cfg(policy="fcfs", max_batch=1))
    gen = {"a": 30, "b": 1}
    s.add("a", 8, 30, 0.0)
    s.add("b", 2, 1, 0.1)
    order = []
    now = 0.0
    while s.has_unfinished():
        plan = _step(s, now, gen)
        order += [w.request_id for w in plan.work if w.sample]
        now += 0.01
    assert order == ["a"] * 30 + ["b"] and s.stats()["preemptions"] == 0


def _long_vs_short_stream(starve_limit, tail_slack=1e9):
    """Batch of 1; a 3-iteration short job arrives every 3 iterations, so Q0 is never empty."""
    s = Scheduler(_cfg(max_batch=1, starve_limit=starve_limit, tail_slack=tail_slack))
    s.add("long", 4, 40, 0.0)
    gen = {"long": 40}
    now, it = 0.0, 0
    while "long" in s.jobs and it < 3000:
        if it % 3 == 0:
            rid = f"s{it}"
            s.add(rid, 4, 3, now)
            gen[rid] = 3
        _step(s, now, gen)
        now += 0.05
        it += 1
    return s


def test_starvation_guard_under_adversarial_short_stream():
    s = _long_vs_short_stream(starve_limit=1.0)
    assert "long" not in s.jobs, "the long job starved despite the guard"
    assert s.stats()["promotions"] >= 1
    assert "long" in _long_vs_short_stream(starve_limit=1e9).jobs   # without the guard it starves


def test_tail_guard_alone_rescues_the_long_job():
    s = _long_vs_short_stream(starve_limit=None, tail_slack=2.0)
    assert "long" not in s.jobs, "the long job starved despite the tail guard"
    assert s.policy.tail_promotions >= 1
    assert "long" in _long_vs_short_stream(starve_limit=None, tail_slack=1e9).jobs    # positive control


def test_swap_and_recompute_keep_page_ownership():
    # 12 usable device pages of 4 tokens; jobs of 24 tokens need 6 pages: at most two fit on device.
    s = Scheduler(_cfg(max_batch=3, num_device_pages=13, num_host_pages=6, page_size=4))
    gen = {}
    for i in range(4):
        s.add(f"j{i}", 12, 12, 0.01 * i)
        gen[f"j{i}"] = 12
    now = 0.0
    swapped_in_before_run = True
    while s.has_unfinished():
        plan = _step(s, now, gen)
        for w in plan.work:                   # a job's work only once its KV is on device
            swapped_in_before_run &= s.jobs.get(w.request_id) is None or not s.jobs[w.request_id].host_pages
        now += 0.03
    st_ = s.stats()
    assert swapped_in_before_run
    assert st_["swap_out_pages"] > 0 and st_["swap_in_pages"] > 0 and st_["recomputes"] > 0
    assert st_["device_pages_used"] == 0 and st_["host_pages_used"] == 0


def test_abort_frees_device_and_host_pages():
    s = Scheduler(_cfg(num_device_pages=11, num_host_pages=8, max_batch=1, base_quantum=0.02))
    gen = {"a": 20, "b": 20}
    s.add("a", 16, 20, 0.0)
    s.add("b", 16, 20, 0.0)
    t = 0
    while s.stats()["host_pages_used"] == 0 and t < 40:
        _step(s, t * 0.05, gen)
        t += 1
    assert s.stats()["host_pages_used"] > 0          # one of them sits on the host now
    s.abort("a")
    s.abort("b")
    s.abort("unknown")                        # no-op
    s.check_invariants()
    assert s.stats()["device_pages_used"] == 0 and s.stats()["host_pages_used"] == 0


def test_bad_requests():
    s = Scheduler(_cfg(num_device_pages=5))
    with pytest.raises(ValueError, match="KV pages"):
        s.add("big", 100, 10, 0.0)
    s.add("x", 4, 4, 0.0)
    with pytest.raises(ValueError, match="duplicate"):
        s.add("x", 4, 4, 0.0)
    with pytest.raises(ValueError):
        SchedulerConfig(max_batch=1, max_tokens_per_step=1, max_prefill_chunk=1, page_size=4, num_device_pages=8,
                        num_host_pages=0, policy="lifo")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 2), st.integers(1, 40), st.integers(1, 30)), min_size=1, max_size=25),
       st.sampled_from(["mlfq", "fcfs"]), st.integers(19, 40), st.integers(0, 30))
def test_random_traces_finish_with_pages_accounted(jobs, policy, dev_pages, host_pages):
    trace = [{"arrival": a, "prompt_len": p, "output_len": o} for a, p, o in jobs]
    cfg = _cfg(policy=policy, num_device_pages=dev_pages, num_host_pages=host_pages, max_batch=3)
    res, stats = simulate(trace, cfg, check_every=1)
    assert len(res) == len(trace)
    assert all(r.finish >= r.first_token >= r.arrival for r in res)
    assert stats["device_pages_used"] == 0 and stats["host_pages_used"] == 0


def test_scheduler_never_imports_jax():
    code = ("import sys; import ferry.scheduler.scheduler, scheduler.simulator, scheduler.workload; "
            "assert 'jax' not in sys.modules, 'scheduler imported jax'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("cap", [1, 2, None])
def test_prefill_rows_per_plan_are_capped_and_decode_rows_still_join(cap):
    """``max_prefill_rows`` (the engine's step size) caps the prefill chunks of one plan; a decode row
    still joins past the cap. Without a cap (positive control) all waiting prompts are chunked at once."""
    s = Scheduler(_cfg(max_batch=8, max_tokens_per_step=128, max_prefill_chunk=8, max_prefill_rows=cap,
                       policy="fcfs"))
    s.add("d", 3, 10, now=0.0)
    plan = s.schedule(0.0)
    s.on_step_done(plan, 0.1)                                   # "d" is decoding now
    for i in range(4):
        s.add(f"p{i}", 6, 5, now=0.2 + i)
    plan = s.schedule(5.0)
    s.check_plan(plan)
    assert len(plan.prefill_items) == (4 if cap is None else cap)
    assert [w.request_id for w in plan.decode_items] == ["d"]


@pytest.mark.parametrize("window", [8, None])
def test_pages_sliding_out_of_every_window_are_freed(window):
    """With a window on every layer, the leading pages no later query can see are freed (their
    block-table entries become the null page) as the job advances; a drop resets them. Without a
    window (the positive control) no page is ever freed."""
    S = 4
    s = Scheduler(_cfg(page_size=S, window=window, policy="fcfs"))
    s.add("a", 6, 30, now=0.0)
    for step in range(30):
        plan = s.schedule(float(step))
        s.check_invariants()
        s.on_step_done(plan, float(step) + 0.5)
        job = s.jobs["a"]
        p = job.num_computed                                   # the next query's position
        want = 0 if window is None else max(0, (p - window + 1) // S)
        assert job.released == want, (step, p)
        table = s.block_table("a")
        assert table[:want] == [0] * want and 0 not in table[want:]
        assert len(table) * S >= p and s.device.num_used == len(table) - want
    assert (s.counters["window_pages_freed"] > 0) == (window is not None)
    s.abort("a")
    s.check_invariants()
    assert s.device.num_used == 0

"""MLFQ tail guard: no job waits past the documented bound (hypothesis traces), pure Python.

Bound (scheduler/mlfq.py, change 3): at every ``schedule(now)``, a job outside the tail class that
was not in the previous batch has waited (time since arrival outside a batch) at most
``tail_slack * (served + ahead + wait_floor)``; and the oldest tail-class job is in the batch whenever its
pages fit (memory is ample here).
"""
import dataclasses

import pytest
from hypothesis import example, given, settings, strategies as st

from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.mlfq import SkipJoinMLFQ
from ferry.scheduler.policy import Policy
from ferry.scheduler.request_state import Job, State
from ferry.scheduler.scheduler import Scheduler, SchedulerConfig

COST = CostModel(base=0.01, per_prefill_token=0.001, per_decode_row=0.001, per_context_token=0.0, per_swap_page=0.0)


def _cfg(max_batch, tail_slack=2.0):
    return SchedulerConfig(max_batch=max_batch, max_tokens_per_step=64, max_prefill_chunk=32, page_size=4,
                           num_device_pages=400, num_host_pages=0, policy="mlfq", cost_model=COST,
                           tail_slack=tail_slack)


def run_and_check(trace, cfg, max_iters=20_000):
    """Drive the scheduler like the simulator; return (violations of the bound, unfinished job ids)."""
    s = Scheduler(cfg)
    pol = s.policy
    pending = sorted(range(len(trace)), key=lambda i: trace[i]["arrival"])
    left = {str(i): t["output_len"] for i, t in enumerate(trace)}
    arrival = {str(i): t["arrival"] for i, t in enumerate(trace)}
    violations, now, it = [], 0.0, 0
    while (pending or s.has_unfinished()) and it < max_iters:
        while pending and trace[pending[0]]["arrival"] <= now:
            i = pending.pop(0)
            s.add(str(i), trace[i]["prompt_len"], trace[i]["output_len"], trace[i]["arrival"],
                  length_hint=trace[i].get("length_hint"))
        if not s.has_unfinished():
            now = trace[pending[0]]["arrival"]
            continue
        idle = {j.rid for j in s.jobs.values() if j.state != State.RUNNING}
        plan = s.schedule(now)
        for j in s.jobs.values():
            waited = now - j.arrival - j.served
            if j.rid in idle and j.queue >= 0 and waited > pol.wait_bound(j) + 1e-9:
                violations.append((j.rid, now, waited, pol.wait_bound(j)))
        tail = sorted((j for j in s.jobs.values() if j.queue < 0), key=lambda j: j.arrival)
        if tail and tail[0].rid not in {w.request_id for w in plan.work}:
            violations.append((tail[0].rid, now, "oldest tail job left out"))
        now += max(s.last_iteration_cost, 1e-3)
        done = []
        for w in plan.work:
            if w.sample:
                left[w.request_id] -= 1
                if left[w.request_id] == 0:
                    done.append(w.request_id)
        s.on_step_done(plan, now, finished=done)
        it += 1
    assert all(arrival[r] <= now for r in s.jobs)
    return violations, set(s.jobs)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 3), st.integers(1, 60), st.integers(1, 80)), min_size=1, max_size=30),
       st.integers(1, 3))
@example([(0.0, 1, 1)] * 8 + [(1.0, 1, 17), (1.0, 1, 17), (1.0, 1, 37)], 1)   # jobs "9" and "10" arrive together:
def test_no_job_waits_past_the_bound(jobs, max_batch):                       # the head is the one added first
    trace = [{"arrival": a, "prompt_len": p, "output_len": o} for a, p, o in jobs]
    violations, unfinished = run_and_check(trace, _cfg(max_batch))
    assert not violations
    assert not unfinished


def _short_stream():
    """One long job; a 3-token job (~0.035 s of work) arrives every 0.03 s for 15 s: one slot, Q0 never empty."""
    trace = [{"arrival": 0.0, "prompt_len": 4, "output_len": 200}]
    trace += [{"arrival": 0.01 + 0.03 * k, "prompt_len": 4, "output_len": 3} for k in range(500)]
    return trace


def test_bound_holds_on_an_adversarial_stream_and_the_check_can_fail(monkeypatch):
    violations, unfinished = run_and_check(_short_stream(), _cfg(1))
    assert not violations and not unfinished
    # Positive control: with the guard switched off the same check reports the starved long job.
    monkeypatch.setattr(SkipJoinMLFQ, "refresh", Policy.refresh)
    violations, _ = run_and_check(_short_stream(), _cfg(1))
    assert any(v[0] == "0" for v in violations)


def test_wait_floor_and_q0_follow_the_observed_service():
    m = SkipJoinMLFQ(COST, max_batch=4)
    q0_prior, floor_prior = m.q0, m.wait_floor
    job = dataclasses.make_dataclass("J", [("attained", float), ("served", float), ("generated", int, dataclasses.field(default=0)),
                                          ("length_hint", object, dataclasses.field(default=None)),
                                          ("arrival", float, dataclasses.field(default=0.0)),
                                          ("last_run", float, dataclasses.field(default=0.0))])
    for k in range(128):                     # parameters are refreshed every 16 finished jobs
        m.on_finish(job(attained=0.001 * (k + 1), served=0.01 * (k + 1)))
    assert m.q0 != q0_prior and abs(m.q0 - 0.001 * 115) < 1e-9            # 90th percentile of attained
    assert m.wait_floor != floor_prior and abs(m.wait_floor - 0.01 * 126) < 1e-9   # 99th of time in batches
    fixed = SkipJoinMLFQ(COST, base_quantum=0.05, max_batch=4)
    for k in range(100):
        fixed.on_finish(job(attained=1.0, served=1.0))
    assert fixed.q0 == 0.05                                              # base_quantum pins Q0


def test_a_job_behind_a_backlog_may_wait_for_it_as_under_fcfs():
    """``ahead``: the expected work left of the jobs that arrived before a job, measured at its first
    refresh; its wait bound grows by tail_slack times that (FCFS would make it wait about as long)."""
    m = SkipJoinMLFQ(COST, max_batch=4)
    first = Job("a", prompt_len=100, max_tokens=50, arrival=0.0)
    m.on_add(first, 0.0)
    m.refresh([first], 0.0)
    assert first.ahead == 0.0                                 # positive control: nothing before it
    late = Job("b", prompt_len=10, max_tokens=5, arrival=1.0)
    m.on_add(late, 1.0)
    m.refresh([first, late], 1.0)
    assert first.ahead == 0.0                                 # measured once
    assert late.ahead == pytest.approx(m.expected_left(first)) and late.ahead > 0.1   # 100 prompt tokens
    alone = Job("c", prompt_len=10, max_tokens=5, arrival=2.0)
    m.on_add(alone, 2.0)
    m.refresh([alone], 2.0)
    assert m.wait_bound(late) - m.wait_bound(alone) == pytest.approx(m.tail_slack * late.ahead)

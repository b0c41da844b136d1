"""Gittins index and Kaplan-Meier survival (scheduler/gittins.py) against direct computations on fresh
random samples, and the MLFQ queue order they give (scheduler/mlfq.py, change 6)."""
import dataclasses

import numpy as np
import pytest

from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.gittins import gittins_index, survival
from ferry.scheduler.mlfq import SkipJoinMLFQ

COST = CostModel(base=0.01, per_prefill_token=0.001, per_decode_row=0.001, per_context_token=0.0,
                 per_swap_page=0.0)


def direct_index(samples, age, quantum=0.0):
    """Definition on the empirical distribution: max over thresholds y >= age + quantum of
    P(S <= y | S > age) / E[min(S, y) - age | S > age]."""
    rest = np.sort(np.asarray([x for x in samples if x > age]))
    best = None
    for y in [age + quantum, *rest]:
        if y < age + quantum or y <= age or not np.any(rest <= y):
            continue
        p = np.mean(rest <= y)
        e = np.mean(np.minimum(rest, y) - age)
        best = p / e if best is None else max(best, p / e)
    return best


@pytest.mark.parametrize("draw", range(5))
def test_index_matches_the_definition_on_random_samples(draw):
    rng = np.random.default_rng()                            # fresh samples every run
    samples = list(rng.pareto(1.2, 200) + rng.random(200))
    steps = survival(samples, [])
    for age in [0.0, *rng.choice(samples, 5)]:
        for quantum in (0.0, float(rng.exponential(1.0))):
            want = direct_index(samples, age, quantum)
            got = gittins_index(steps, age, quantum)
            assert (want is None and got is None) or got == pytest.approx(want, rel=1e-9)


def test_kaplan_meier_with_censoring_matches_a_hand_computation():
    # events 1, 3; censored 2 (at risk for t <= 2), 4: F(1) = 3/4, F(3) = 3/4 * (1 - 1/2) = 3/8
    assert survival([1.0, 3.0], [2.0, 4.0]) == [(1.0, 0.75), (3.0, 0.375)]
    assert survival([], [1.0]) == []                        # nothing finished: no steps
    # Censored jobs lower the index of old ages: a long job still running means long jobs exist.
    done = [1.0] * 20 + [5.0] * 2
    assert gittins_index(survival(done, [6.0] * 10), 2.0) < gittins_index(survival(done, []), 2.0)


def test_index_falls_with_age_for_heavy_tails_and_rises_past_a_short_mode():
    rng = np.random.default_rng()
    pareto = list(1 + rng.pareto(0.9, 2000))                  # decreasing hazard
    steps = survival(pareto, [])
    ages = [1.0, 2.0, 4.0, 8.0]                              # (below 1 nothing can finish)
    idx = [gittins_index(steps, a, quantum=a) for a in ages]     # doubling quanta, as the MLFQ's
    assert all(a > b for a, b in zip(idx, idx[1:]))
    bimodal = list(rng.uniform(0.0, 1.0, 900)) + list(rng.uniform(10.0, 12.0, 100))
    steps = survival(bimodal, [])
    assert gittins_index(steps, 11.0, 0.5) > gittins_index(steps, 10.0, 0.5) > gittins_index(steps, 2.0, 0.5)


def _finished(m, attained):
    job = dataclasses.make_dataclass("J", [("attained", float), ("served", float), ("generated", int, dataclasses.field(default=0))])
    for a in attained:
        m.on_finish(job(attained=a, served=a))


def test_mlfq_serves_an_old_queue_first_when_its_jobs_are_near_the_end():
    rng = np.random.default_rng()
    m = SkipJoinMLFQ(COST, max_batch=4)
    assert m.queue_rank == list(range(m.num_queues))        # FastServe order before any evidence
    # 90% finish within 0.05 s of service, 10% need 0.5-0.6 s: past the short mode a job is near its end.
    _finished(m, list(rng.uniform(0.005, 0.05, 230)) + list(rng.uniform(0.5, 0.6, 26)))
    m.refresh([], 0.0)
    level = m.level(0.45)
    assert level >= 2 and m.queue_rank[level] < m.queue_rank[1]   # the old queue outranks a middle one
    assert m.queue_rank[0] == 0                             # new jobs still first (90% of them are short)
    # Positive control: heavy-tailed service keeps FastServe's order (top queue first).
    h = SkipJoinMLFQ(COST, max_batch=4)
    _finished(h, list(0.005 * (1 + rng.pareto(0.8, 256))))
    h.refresh([], 0.0)
    assert h.queue_rank == list(range(h.num_queues))


def test_eviction_gap_follows_the_queue_order():
    m = SkipJoinMLFQ(COST, max_batch=4)
    m.queue_rank = [0, 5, 4, 3, 2, 1]                        # queue 5 served right after queue 0
    J = dataclasses.make_dataclass("J", [("queue", int)])
    assert m.may_evict(J(1), J(5))                           # queue 1 ranks 4 places below queue 5
    assert not m.may_evict(J(5), J(1))                       # the served-first queue keeps its KV
    assert not m.may_evict(J(4), J(5))                       # one place apart: no eviction

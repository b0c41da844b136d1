"""Gittins index and Kaplan-Meier survival (scheduler/gittins.py) against direct computations on fresh
random samples, and the MLFQ queue order they give (scheduler/mlfq.py, change 6)."""
import dataclasses

import numpy as np
import pytest

from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.gittins import gittins_curve, gittins_index, index_from_curve, survival, token_index
from ferry.scheduler.mlfq import SkipJoinMLFQ

COST = CostModel(base=0.01, per_prefill_token=0.001, per_decode_row=0.001, per_context_token=0.0,
                 per_swap_page=0.0)


def direct_index(samples, age, quantum=0.0, known=0.0):
    """Definition on the empirical distribution: max over thresholds y >= age + quantum of
    P(S <= y | S > age) / (known + E[min(S, y) - age | S > age])."""
    rest = np.sort(np.asarray([x for x in samples if x > age]))
    best = None
    for y in [age + quantum, *rest]:
        if y < age + quantum or y <= age or not np.any(rest <= y):
            continue
        p = np.mean(rest <= y)
        e = known + np.mean(np.minimum(rest, y) - age)
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


@pytest.mark.parametrize("draw", range(3))
def test_index_when_every_job_ends_within_the_quantum(draw):
    """Bounded sizes (a bimodal mix's long mode): past its start every job ends before the quantum
    does, and the index is 1 / the mean service left (the threshold at the quantum's end). The sweep's
    bimodal cells once got None here and kept FastServe's order for the oldest queues."""
    rng = np.random.default_rng()
    samples = list(rng.uniform(512, 1024, 100))
    steps = survival(samples, [])
    age = float(rng.uniform(100, 1000))
    rest = [x - age for x in samples if x > age]
    got = gittins_index(steps, age, quantum=2048.0)
    assert got == pytest.approx(direct_index(samples, age, 2048.0), rel=1e-9)
    assert got == pytest.approx(1.0 / np.mean(rest), rel=1e-9)
    assert gittins_index(survival(samples, [2000.0]), age, quantum=2048.0) < got    # a censored job: F > 0 past the last event


@pytest.mark.parametrize("draw", range(5))
def test_index_with_known_work_first_matches_the_definition(draw):
    """A job that must first spend ``known`` seconds (a prompt to prefill) before it can end: the upper
    hull kept by gittins_curve gives the same maximum as every threshold; more known work, lower index."""
    rng = np.random.default_rng()
    samples = list(rng.pareto(1.2, 200) + rng.random(200)) if draw % 2 else list(rng.uniform(1, 3, 200))
    steps = survival(samples, [])
    age, quantum = float(rng.choice(samples)) * 0.5, float(rng.exponential(0.5))
    curve = gittins_curve(steps, age, quantum)
    assert len(curve[1]) <= len(steps)
    last = None
    for known in (0.0, *sorted(rng.exponential(2.0, 4))):
        got = index_from_curve(curve, known)
        assert got == pytest.approx(direct_index(samples, age, quantum, known), rel=1e-9)
        assert last is None or got < last
        last = got


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


def _finished(m, attained, generated=None):
    job = dataclasses.make_dataclass("J", [("attained", float), ("served", float), ("generated", int, dataclasses.field(default=0)),
                                          ("length_hint", object, dataclasses.field(default=None)),
                                          ("arrival", float, dataclasses.field(default=0.0)),
                                          ("last_run", float, dataclasses.field(default=0.0))])
    for a, g in zip(attained, generated if generated is not None else [0] * len(attained)):
        m.on_finish(job(attained=a, served=a, generated=int(g)))


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
    J = dataclasses.make_dataclass("J", [("queue", int), ("length_hint", object, dataclasses.field(default=None))])
    assert m.may_evict(J(1), J(5))                           # queue 1 ranks 4 places below queue 5
    assert not m.may_evict(J(5), J(1))                       # the served-first queue keeps its KV
    assert not m.may_evict(J(4), J(5))                       # one place apart: no eviction


def _job(rid, queue, arrival=0.0, prompt_len=8, computed=8):
    from ferry.scheduler.request_state import Job
    j = Job(rid, prompt_len, 64, arrival)
    j.queue, j.num_computed, j.enqueued = queue, computed, arrival
    return j


def test_a_job_still_prefilling_ranks_by_the_work_it_must_do_first():
    """Change 10 (and 8b before it): a job still prefilling is ranked by the Gittins index at age 0 with
    its prompt left as known work first, so more prompt left ranks lower (the summarisation mix's long
    prompts once jumped every queue); once prefilled, it takes the plain index at age 0."""
    rng = np.random.default_rng()
    m = SkipJoinMLFQ(COST, max_batch=4)
    tokens = list(rng.integers(8, 65, 230)) + list(rng.integers(512, 1025, 26))
    _finished(m, [m.token_cost * t for t in tokens], tokens)
    m.refresh([], 0.0)
    long_left = _job("long", 0, arrival=1.0, prompt_len=1000, computed=0)
    short_left = _job("short", 0, arrival=2.0, prompt_len=1000, computed=990)
    assert [j.rid for j in m.order([long_left, short_left])] == ["short", "long"]
    k = COST.per_prefill_token * 1000 / m.token_cost
    assert m.job_index(long_left, 0) == pytest.approx(token_index(m.token_F, 0, known=k))
    long_left.num_computed = 1000                               # prefill done: the plain index at age 0
    assert m.job_index(long_left, 0) == pytest.approx(token_index(m.token_F, 0))
    assert m.job_index(long_left, 0) > m.job_index(short_left, 0)


def test_only_the_oldest_tail_class_job_goes_before_every_queue():
    """TAIL_HEADS = 1: the oldest tail-class job is first and may take anyone's KV; a younger one is
    first only inside the level it left, and evicts by that level's gap (bursts once promoted many long
    jobs at once, which held the scarce KV and kept new short jobs out)."""
    m = SkipJoinMLFQ(COST, max_batch=4)
    a, b = _job("a", 3, arrival=1.0), _job("b", 3, arrival=2.0)
    for j in (a, b):
        j.tail_from, j.queue = j.queue, -1
    q0, q3 = _job("q0", 0, arrival=5.0), _job("q3", 3, arrival=0.5)
    m.refresh([q0, q3, b, a], 0.0)                            # picks the heads (nobody waited yet)
    assert [j.rid for j in m.order([q0, q3, b, a])] == ["a", "q0", "b", "q3"]
    assert m.may_evict(q0, a)                                 # the head takes anyone's KV
    assert not m.may_evict(q0, b) and m.may_evict(_job("q5", 5), b)   # b evicts like a queue-3 job
    assert not m.may_evict(b, q0)                             # tail-class jobs keep their KV


def _direct_token_index(lengths, age):
    """The definition on the empirical lengths: max over b > age of P(age < L <= b) / sum_{t=age}^{b-1} P(L > t)."""
    L = np.asarray(lengths)
    F = lambda t: np.mean(L > t)                              # noqa: E731
    return max((F(age) - F(b)) / sum(F(t) for t in range(age, b)) for b in range(age + 1, L.max() + 1))


def test_a_decoding_job_ranks_by_the_index_at_its_grid_age():
    """Change 10: a decoding job takes the Gittins index per output token at the grid age
    floor(AGE_GRID**k) at or below its generated tokens, on the Kaplan-Meier estimate of output lengths.
    Past bimodal's short mode (rising hazard) the older job goes first; with heavy tails (falling hazard)
    the younger; two jobs at the same grid age keep the order they entered their queue in."""
    from ferry.scheduler.mlfq import AGE_GRID
    rng = np.random.default_rng()
    m = SkipJoinMLFQ(COST, max_batch=4)
    tokens = list(rng.integers(8, 65, 230)) + list(rng.integers(512, 1025, 26))
    _finished(m, [m.token_cost * t for t in tokens], tokens)
    m.refresh([], 0.0)
    young, old = _job("young", 3, arrival=1.0), _job("old", 3, arrival=2.0)
    young.generated, old.generated = 100, 600
    grid = [int(AGE_GRID ** k) for k in range(40)]
    assert max(a for a in grid if a <= 100) == 90 and max(a for a in grid if a <= 600) == 512
    assert m.job_index(young, 3) == pytest.approx(_direct_token_index(tokens, 90))
    assert m.job_index(old, 3) == pytest.approx(_direct_token_index(tokens, 512))
    assert [j.rid for j in m.order([young, old])] == ["old", "young"]
    twin = _job("twin", 3, arrival=0.5)
    twin.generated, twin.enqueued = 95, 5.0                    # same grid age as young, entered the queue later
    assert m.job_index(twin, 3) == m.job_index(young, 3)
    assert [j.rid for j in m.order([twin, young])] == ["young", "twin"]
    # Heavy tails (a Pareto's quantiles): the index falls with age, so the younger job goes first.
    h = SkipJoinMLFQ(COST, max_batch=4)
    pareto = [int(min(4096, round(8 * (1 - (i + 0.5) / 256) ** (-1 / 0.8)))) for i in range(256)]
    _finished(h, [h.token_cost * t for t in pareto], pareto)
    h.refresh([], 0.0)
    old, young = _job("old", 3, arrival=1.0), _job("young", 3, arrival=2.0)
    old.generated, young.generated = 600, 100
    assert h.job_index(young, 3) > h.job_index(old, 3)
    assert [j.rid for j in h.order([old, young])] == ["young", "old"]


def test_an_age_past_the_estimate_reads_the_oldest_observed_age():
    from ferry.scheduler.gittins import last_observed_age, token_survival
    F = token_survival([3, 5, 9], [])                     # every job ended by 9 tokens: F[9:] = 0
    assert last_observed_age(F, 4) == 4                   # inside the estimate: the age itself
    assert last_observed_age(F, 9) == last_observed_age(F, 500) == 8    # past it: the oldest age with F > 0
    assert token_index(F, 8) > 0 == token_index(F, 9)

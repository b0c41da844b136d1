"""The Boost reference (scheduler/boost_ref.py): its boost function, its two limits (a large scale is
FCFS, a small one shortest-size-first), and the sweep's frontier count over its scales."""
import math
import os
import sys

import numpy as np
import pytest

from ferry.scheduler.boost_ref import BoostReference, boost
from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.request_state import Job
from ferry.scheduler.scheduler import SchedulerConfig
from ferry.scheduler.simulator import simulate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COST = CostModel(base=0.01, decode_base=0.008, per_prefill_token=1e-4, per_decode_row=4e-5, per_context_token=0.0,
                 per_swap_page=0.0)


def summary(avg: float, p99: float, ttft: float = 1.0) -> dict:
    """A policy's summary in a sweep cell, as the frontier counts read it."""
    return {"avg_jct": avg, "p99_jct": p99, "avg_ttft": ttft}


def test_boost_falls_with_size_and_its_gaps_tend_to_log_ratios_over_g():
    sizes = [0.001, 0.01, 0.1, 1.0, 10.0]
    for g in (0.01, 1.0, 10.0):
        b = [boost(s, g) for s in sizes]
        assert all(x > y > 0 for x, y in zip(b, b[1:])), (g, b)
    g = 1e-6                                   # small g: b(s1) - b(s2) -> ln(s2 / s1) / g
    assert boost(0.1, g) - boost(1.0, g) == pytest.approx(math.log(10) / g, rel=1e-4)
    assert boost(1.0, 50.0) == pytest.approx(math.exp(-50.0) / 50.0)        # large g: ~e^(-gs) / g, FCFS
    assert boost(0.0, 1.0) == pytest.approx(-math.log(1e-12))                # size 0: finite


def _ranked(scale, jobs):
    pol = BoostReference(COST, 8, scale)
    for j in jobs:
        pol.on_add(j, j.arrival)
    return [j.rid for j in pol.order(list(reversed(jobs)))]


def test_a_large_scale_is_fcfs_and_a_small_one_shortest_size_first():
    rng = np.random.default_rng()
    jobs = [Job(f"j{i}", int(rng.integers(8, 2000)), int(rng.integers(1, 500)), 1e-4 * i) for i in range(12)]
    size = BoostReference(COST, 8, 1.0).size
    fcfs = [j.rid for j in jobs]
    shortest = [j.rid for j in sorted(jobs, key=size)]
    assert fcfs != shortest                                  # the two limits differ on these jobs (control)
    assert _ranked(1e6, jobs) == fcfs
    assert _ranked(1e-9, jobs) == shortest
    with pytest.raises(ValueError, match="boost_scale"):
        SchedulerConfig(max_batch=1, max_tokens_per_step=8, max_prefill_chunk=8, page_size=4, num_device_pages=8,
                        num_host_pages=8, policy="boost", boost_scale=0.0)


def _run(policy, trace, **kw):
    cfg = SchedulerConfig(max_batch=4, max_tokens_per_step=4 + 64, max_prefill_chunk=64, page_size=16,
                          num_device_pages=400, num_host_pages=400, policy=policy, cost_model=COST, **kw)
    res, stats = simulate(trace, cfg, check_every=1)
    assert stats["finished"] == len(trace)
    return [r.jct for r in res]


def test_simulated_limits_match_fcfs_and_shortest_first_and_trade_between():
    """A burst of long jobs then short ones: a large scale gives FCFS's JCTs exactly, a small one
    the oracle's average (every job's size known, all in before any finishes), a middle one between."""
    rng = np.random.default_rng()
    trace = [{"arrival": 0.0005 * i, "prompt_len": int(rng.integers(16, 64)),
              "output_len": int(rng.integers(300, 400) if i < 6 else rng.integers(2, 20))} for i in range(18)]
    fcfs, large = _run("fcfs", trace), _run("boost", trace, boost_scale=1e6)
    assert large == fcfs
    oracle, small = _run("oracle", trace), _run("boost", trace, boost_scale=1e-9)
    avg = {k: float(np.mean(v)) for k, v in (("fcfs", fcfs), ("oracle", oracle), ("small", small))}
    assert avg["small"] < 0.5 * avg["fcfs"]                  # short jobs no longer wait behind the long ones
    assert avg["small"] == pytest.approx(avg["oracle"], rel=0.05)


def test_frontier_counts_a_cell_only_where_one_scale_meets_both_targets():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import sweep_scheduler as S

    def row(mix, boosts, mlfq=(1.1, 10.0)):
        r = {"cell": {"mix": mix, "load": 0.5}, "fcfs": summary(2.0, 10.0), "oracle": summary(1.0, 12.0),
             "boost": [{"scale": c} | summary(a, p) for c, (a, p) in zip((0.1, 1.0, 10.0), boosts)]}
        r["mlfq"] = summary(*mlfq)                                     # oracle's average 1.0, FCFS's p99 10.0
        r |= {pol: summary(3.0, 20.0) for pol in ("gittins", "ttft")}  # the references miss both
        return r

    feasible = row("a", [(1.0, 11.0), (1.1, 10.0), (2.0, 9.0)])      # scale 1: 1.1x the oracle, p99 = FCFS's
    too_slow = row("a", [(1.0, 11.0), (1.2, 10.0), (2.0, 9.0)])      # p99 met only at 1.2x and 2x the oracle
    no_p99 = row("b", [(1.0, 11.0), (1.05, 10.5), (1.1, 10.2)], mlfq=(1.2, 9.0))   # only FCFS: 2x the oracle
    fcfs_close = row("b", [(1.0, 11.0), (1.05, 10.5), (1.1, 10.2)])
    fcfs_close["fcfs"]["avg_jct"] = 1.15                             # FCFS, the limit, within 15% of the oracle
    assert S.best_boost_avg(feasible) == pytest.approx(1.1)
    assert S.best_boost_avg(too_slow) == pytest.approx(1.2)
    assert S.best_boost_avg(no_p99) == pytest.approx(2.0)
    assert S.best_boost_avg(fcfs_close) == pytest.approx(1.15)
    f = S.boost_frontier([feasible, too_slow, no_p99, fcfs_close])
    assert f["scales"] == [0.1, 1.0, 10.0]
    assert f["avg_and_p99_met_by_some_scale"] == 2 and f["all_three_met_by_some_scale"] == 2
    assert f["mlfq_avg_and_p99_met"] == 3 and f["mlfq_avg_and_p99_met_where_no_scale_did"] == 1
    assert f["avg_and_p99_met_by_any_order"] == 3                    # the MLFQ's three; no order in no_p99
    assert f["by_mix"] == {"a": {"cells": 2, "boost_avg_and_p99": 1, "mlfq_avg_and_p99": 2},
                           "b": {"cells": 2, "boost_avg_and_p99": 1, "mlfq_avg_and_p99": 1}}


def test_any_order_counts_a_cell_where_some_policy_or_scale_meets_the_targets():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import sweep_scheduler as S

    def row(load, **met):                   # every order misses (3x the oracle, p99 2x FCFS's) unless named
        r = {"cell": {"mix": "a", "load": load}, "fcfs": summary(3.0, 10.0, ttft=5.0), "oracle": summary(1.0, 12.0)}
        r |= {pol: summary(3.0, 20.0) for pol in ("mlfq", "gittins", "ttft")}
        r["boost"] = [{"scale": c} | summary(3.0, 20.0) for c in (0.1, 10.0)]
        for name, s in met.items():
            if name.startswith("boost"):
                r["boost"][int(name[-1])] |= s
            else:
                r[name] = s
        return r

    none = row(0.5)
    gittins = row(0.5, gittins=summary(1.1, 10.0))                    # a reference alone meets both
    scale = row(0.8, boost1=summary(1.15, 9.0))                        # a scale, and its TTFT 5x below FCFS's
    slow_ttft = row(0.8, mlfq=summary(1.0, 9.0, ttft=2.0))             # both, but TTFT only 2.5x below at load 0.8
    fcfs = row(0.5)
    fcfs["fcfs"]["avg_jct"] = 1.1                                    # FCFS itself within 15% of the oracle
    f = S.boost_frontier([none, gittins, scale, slow_ttft, fcfs])
    assert f["avg_and_p99_met_by_any_order"] == 4
    assert f["all_three_met_by_any_order"] == 3
    assert S.boost_frontier([none])["avg_and_p99_met_by_any_order"] == 0

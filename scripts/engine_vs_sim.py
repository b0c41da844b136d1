"""The real engine against the simulator: what an engine run measured, and the simulator's clock fitted to it.

* ``dispatch_log`` / ``dispatch_profile``: every dispatch of an engine run, by ``Plan.kind``, with the
  cost-model seconds the simulator would charge and the wall seconds it took.
* ``fit_clock``: the ``ClockScale`` at which the simulated FCFS average JCT equals the engine run's
  (fitted on FCFS alone: the other policies are the prediction), one factor or, ``by_kind``, that
  factor times each kind's measured wall / cost-model ratio. One scale is the default: on the two CPU
  traces (three engine runs each) it picked the engine's FCFS-vs-MLFQ winner on 9 of 10 metrics, the
  per-kind clock on 7 (README, "Engine and simulator").
* ``agreement``: per metric, whether the simulator picks the engine's FCFS-vs-MLFQ winner and lies
  within the engine's runs.
Used by ``bench_serving.py`` (``--calibrate-to``, ``--clock-by-kind``; every engine run records
``dispatches``).
"""
import dataclasses
import math
import time
from typing import Callable

from ferry.scheduler.simulator import ClockScale


def dispatch_log(engine) -> list[dict]:
    """Log every dispatch of ``engine`` (wraps its ``step``): the plan's kind, its cost-model seconds
    (what the simulator charges) and ``wall_s``, the wall time of the NEXT step call: with dispatch-ahead
    a step blocks reading the previous dispatch, so that call lasts about as long as this dispatch
    (plus the host work of planning the next)."""
    log, inner = [], engine.step

    def step(*args, **kw):
        t, before = time.perf_counter(), engine.last_plan
        out = inner(*args, **kw)
        wall = time.perf_counter() - t
        if log and "wall_s" not in log[-1]:
            log[-1]["wall_s"] = wall
        plan = engine.last_plan
        if plan is not None and plan is not before and plan.work:
            log.append({"kind": plan.kind, "model_s": engine.scheduler.last_iteration_cost})
        return out

    engine.step = step
    return log


def dispatch_profile(log: list[dict]) -> dict:
    """Per kind of dispatch: how many, cost-model seconds, measured seconds and their ratio (the
    engine's speed relative to the cost model, by kind: where the simulator's clock is off)."""
    prof = {}
    for row in log:
        if "wall_s" not in row:
            continue
        p = prof.setdefault(row["kind"], {"dispatches": 0, "model_s": 0.0, "wall_s": 0.0})
        p["dispatches"] += 1
        p["model_s"] += row["model_s"]
        p["wall_s"] += row["wall_s"]
    for p in prof.values():
        p["wall_over_model"] = p["wall_s"] / p["model_s"] if p["model_s"] > 0 else None
    return prof


def fcfs_dispatch_ratios(engine: dict) -> dict | None:
    """Wall over cost-model seconds per kind of dispatch in an engine result's FCFS runs (all runs pooled);
    None when the result has no dispatch profile (older results) or a kind never ran."""
    runs = engine.get("runs", {}).get("fcfs") or [engine["fcfs"]]
    if any("dispatches" not in r for r in runs):
        return None
    total = {}
    for r in runs:
        for kind, p in r["dispatches"].items():
            t = total.setdefault(kind, [0.0, 0.0])
            t[0], t[1] = t[0] + p["wall_s"], t[1] + p["model_s"]
    kinds = [f.name for f in dataclasses.fields(ClockScale)]
    if any(k not in total or total[k][1] <= 0 for k in kinds):
        return None
    return {k: total[k][0] / total[k][1] for k in kinds}


def fit_clock(engine: dict, fcfs_avg_jct: Callable[[ClockScale], float], by_kind: bool = False,
              steps: int = 24) -> dict:
    """The clock at which ``fcfs_avg_jct(clock)`` (a simulation) equals the engine result's FCFS average
    JCT: bisection on the log of one factor over [1/8, 8], times the per-kind ratios when ``by_kind``.
    Raises ValueError when ``by_kind`` and the result has no profile of every kind."""
    target = engine["fcfs"]["avg_jct"]
    ratios = fcfs_dispatch_ratios(engine) if by_kind else None
    if by_kind and ratios is None:
        raise ValueError("no dispatch profile of every kind in its FCFS runs")
    shape = ClockScale(**ratios) if ratios else ClockScale()

    def clock(factor: float) -> ClockScale:
        return ClockScale(*(factor * getattr(shape, f.name) for f in dataclasses.fields(ClockScale)))

    lo, hi = math.log(1 / 8), math.log(8)
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fcfs_avg_jct(clock(math.exp(mid))) < target else (lo, mid)
    factor = math.exp((lo + hi) / 2)
    return {"by_dispatch_kind": ratios is not None, "factor": factor, "engine_dispatch_ratios": ratios,
            "clock": dataclasses.asdict(clock(factor)), "engine_fcfs_avg_jct": target,
            "sim_fcfs_avg_jct": fcfs_avg_jct(clock(factor)),
            "engine_fcfs_over_mlfq": engine.get("fcfs_over_mlfq"),
            "engine_fcfs_over_mlfq_runs": engine.get("fcfs_over_mlfq_runs")}


def agreement(sim: dict, engine: dict, engine_runs: list[dict] | None) -> dict:
    """Per metric of the simulator's FCFS / MLFQ ratios ``sim``: the engine's ratio, whether both pick
    the same winner and, given the engine's per-run ratios, whether ``sim`` lies within their range."""
    out = {}
    for k, v in sim.items():
        if k not in engine:
            continue
        row = {"engine": engine[k], "simulator": v, "same_winner": (engine[k] > 1) == (v > 1)}
        if engine_runs:
            lo, hi = min(r[k] for r in engine_runs), max(r[k] for r in engine_runs)
            row.update(engine_runs_min=lo, engine_runs_max=hi, within_engine_runs=lo <= v <= hi)
        out[k] = row
    return out

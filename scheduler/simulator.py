"""Discrete-event simulation of serving: the real Scheduler objects, a cost-model clock.

Each event is one engine dispatch: ``plan = scheduler.schedule(now)``; the
clock advances by the cost model's time for that plan (prefill tokens,
decode rows, attended context, swapped pages; K iterations for a K-step decode);
every sampled item adds one token to its job (up to K in a K-step decode, as the
engine's rows stop on device at their length); jobs reaching their output
length finish at the end of the dispatch. Arrivals between
iterations join before the next one; an idle system jumps to the next arrival.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ferry.scheduler.scheduler import Scheduler, SchedulerConfig


@dataclasses.dataclass(frozen=True)
class JobResult:
    arrival: float
    first_token: float
    finish: float
    prompt_len: int
    output_len: int

    @property
    def jct(self) -> float:
        return self.finish - self.arrival

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival


@dataclasses.dataclass(frozen=True)
class ClockScale:
    """Clock seconds per cost-model second, by ``Plan.kind``: the engine's measured speed relative to
    its cost model (``bench_serving.py --calibrate-to``). The scheduler still charges cost-model
    seconds, as the engine's does."""
    ragged: float = 1.0
    decode_k1: float = 1.0
    decode_multi: float = 1.0

    def __post_init__(self) -> None:
        if min(self.ragged, self.decode_k1, self.decode_multi) <= 0:
            raise ValueError("clock scales must be > 0")

    @classmethod
    def uniform(cls, scale: float) -> "ClockScale":
        return cls(scale, scale, scale)


def simulate(trace: list[dict], cfg: SchedulerConfig, check_every: int = 0,
             time_scale: float | ClockScale = 1.0) -> tuple[list[JobResult], dict]:
    """Run ``trace`` (dicts with arrival, prompt_len, output_len) to completion.

    Returns per-job results (trace order) and the scheduler's final stats plus
    ``iterations`` and ``makespan``. ``check_every > 0`` verifies page ownership
    invariants every that many iterations (tests). ``time_scale``: clock seconds per
    cost-model second, one number or per kind of dispatch (``ClockScale``); the clock
    advances by it x each plan's cost, as on a machine slower (> 1) or faster than the
    cost model.
    """
    clock = time_scale if isinstance(time_scale, ClockScale) else ClockScale.uniform(time_scale)
    sched = Scheduler(cfg)
    jobs = sorted(range(len(trace)), key=lambda i: trace[i]["arrival"])
    out_len = {str(i): int(trace[i]["output_len"]) for i in range(len(trace))}
    generated = {rid: 0 for rid in out_len}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    now, nxt, iters = 0.0, 0, 0
    while nxt < len(jobs) or sched.has_unfinished():
        while nxt < len(jobs) and trace[jobs[nxt]]["arrival"] <= now:
            i = jobs[nxt]
            hint = trace[i].get("length_hint")
            sched.add(str(i), int(trace[i]["prompt_len"]), out_len[str(i)], float(trace[i]["arrival"]),
                      length_hint=None if hint is None else int(hint))
            nxt += 1
        if not sched.has_unfinished():
            now = float(trace[jobs[nxt]]["arrival"])
            continue
        plan = sched.schedule(now)
        if check_every:
            sched.check_plan(plan)
        dt = sched.last_iteration_cost
        if not plan.work:
            if dt == 0.0 and nxt < len(jobs):       # nothing runnable: wait for the next arrival
                now = max(now, float(trace[jobs[nxt]]["arrival"]))
            elif dt == 0.0:
                raise RuntimeError("simulator: scheduler made no progress with no arrivals left")
        now += dt * getattr(clock, plan.kind)       # (page moves alone: the decode_k1 scale)
        finished, made = [], {}
        for w in plan.work:
            if w.sample:           # a multi-step decode dispatch makes up to decode_steps tokens per row
                n = min(plan.decode_steps, out_len[w.request_id] - generated[w.request_id])
                made[w.request_id] = n
                generated[w.request_id] += n
                first.setdefault(w.request_id, now)
                if generated[w.request_id] >= out_len[w.request_id]:
                    finished.append(w.request_id)
                    done[w.request_id] = now
        sched.on_step_done(plan, now, finished=finished, generated=made)
        iters += 1
        if check_every and iters % check_every == 0:
            sched.check_invariants()
    results = [JobResult(float(t["arrival"]), first[str(i)], done[str(i)], int(t["prompt_len"]),
                         int(t["output_len"])) for i, t in enumerate(trace)]
    stats = sched.stats()
    stats.update(iterations=iters, makespan=now)
    return results, stats


def summarize(results: list[JobResult], stats: dict | None = None) -> dict:
    """avg / p50 / p95 / p99 JCT, avg TTFT, throughput, plus the scheduler counters."""
    jct = np.array([r.jct for r in results])
    ttft = np.array([r.ttft for r in results])
    span = max(r.finish for r in results) - min(r.arrival for r in results)
    s = {"jobs": len(results), "avg_jct": float(jct.mean()), "p50_jct": float(np.percentile(jct, 50)),
         "p95_jct": float(np.percentile(jct, 95)), "p99_jct": float(np.percentile(jct, 99)),
         "avg_ttft": float(ttft.mean()), "p95_ttft": float(np.percentile(ttft, 95)),
         "throughput_tok_s": float(sum(r.output_len for r in results) / max(span, 1e-9))}
    if stats:
        for k in ("preemptions", "demotions", "promotions", "swap_out_pages", "swap_in_pages", "recomputes",
                  "swap_out_pages_saved", "swap_in_pages_saved", "iterations"):
            if k in stats:
                s[k] = stats[k]
    return s

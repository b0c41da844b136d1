"""Serving workloads: synthetic traces and JSONL I/O.

A trace is a list of jobs ``{"arrival": s, "prompt_len": int, "output_len": int}``
(optional ``"prompt"`` text and ``"length_hint"``, a predicted output length), one JSON object per line on disk. Arrivals are
Poisson or Gamma (coefficient of variation ``cv``: burstier when > 1); lengths
are heavy-tailed like the FastServe paper's workloads: most answers are short,
a few are very long (bounded Pareto output lengths, log-normal prompts).
"""
from __future__ import annotations

import json

import numpy as np

from ferry.scheduler.cost_model import CostModel


def heavy_tailed_lengths(rng, n: int, min_len: int, max_len: int, alpha: float) -> np.ndarray:
    """Bounded Pareto(alpha) integers in [min_len, max_len] (inverse-CDF sampling)."""
    u = rng.random(n)
    lo, hi = float(min_len), float(max_len)
    x = (-(u * hi ** alpha - u * lo ** alpha - hi ** alpha) / (hi ** alpha * lo ** alpha)) ** (-1.0 / alpha)
    return np.clip(np.round(x), min_len, max_len).astype(int)


def bimodal_lengths(rng, n: int, short: tuple[int, int], long: tuple[int, int], long_frac: float) -> np.ndarray:
    """Uniform in ``short`` with probability 1 - ``long_frac``, else uniform in ``long`` (inclusive)."""
    is_long = rng.random(n) < long_frac
    return np.where(is_long, rng.integers(long[0], long[1] + 1, n), rng.integers(short[0], short[1] + 1, n))


def job_service_time(cost: CostModel, max_batch: int, prompt_len: float, output_len: float, mean_ctx: float,
                     chunk: int | None = None) -> float:
    """Engine seconds one job consumes at full batch: its prefill plus its share of decode steps.

    With ``chunk`` (the prefill chunk), each prompt token also carries ``base / chunk``: a step holds
    at most one chunk, so long prompts need steps of their own (without it the summarisation mix's
    nominal 0.7 load measured about 2x overloaded on the simulator)."""
    step = cost.iteration_time(decode_rows=max_batch, context_tokens=int(max_batch * mean_ctx))
    per_prompt_token = cost.per_prefill_token + (cost.base / chunk if chunk else 0.0)
    return per_prompt_token * prompt_len + output_len * step / max_batch


def generate(num_jobs: int, *, load: float = 0.85, arrival: str = "gamma", cv: float = 2.0,
             prompt_median: int = 64, prompt_max: int = 512, out_min: int = 8, out_max: int = 1024,
             alpha: float = 1.1, max_batch: int = 16, cost: CostModel | None = None, rate: float | None = None,
             seed: int = 0, long_frac: float = 0.0, short_max: int | None = None, long_min: int | None = None,
             chunk: int | None = None) -> list[dict]:
    """A trace whose offered load is ``load`` x the cost model's decode capacity (or a fixed ``rate`` jobs/s).

    Output lengths: bounded Pareto(``alpha``) in [out_min, out_max]; with ``long_frac`` > 0 a bimodal mix
    instead: uniform in [out_min, short_max] and, with probability ``long_frac``, uniform in [long_min, out_max].
    ``chunk``: the engine's prefill chunk; each chunk then pays one step's ``base`` in the load computation."""
    if arrival not in ("poisson", "gamma"):
        raise ValueError("arrival must be 'poisson' or 'gamma'")
    rng = np.random.default_rng(seed)
    prompts = np.clip(np.round(rng.lognormal(np.log(prompt_median), 0.8, num_jobs)), 4, prompt_max).astype(int)
    if long_frac > 0:
        lm = long_min if long_min is not None else max(out_min + 1, out_max // 2)
        outs = bimodal_lengths(rng, num_jobs, (out_min, short_max or lm - 1), (lm, out_max), long_frac)
    else:
        outs = heavy_tailed_lengths(rng, num_jobs, out_min, out_max, alpha)
    if rate is None:
        cost = cost or CostModel.cpu_default()
        mean_ctx = float(np.mean(prompts) + np.mean(outs) / 2)
        rate = load / job_service_time(cost, max_batch, float(np.mean(prompts)), float(np.mean(outs)), mean_ctx,
                                       chunk)
    mean_gap = 1.0 / rate
    if arrival == "poisson":
        gaps = rng.exponential(mean_gap, num_jobs)
    else:
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, mean_gap / shape, num_jobs)
    t = np.cumsum(gaps) - gaps[0]
    return [{"arrival": round(float(a), 6), "prompt_len": int(p), "output_len": int(o)}
            for a, p, o in zip(t, prompts, outs)]


def add_length_hints(trace: list[dict], sigma: float, seed: int = 0) -> list[dict]:
    """``trace`` with a ``length_hint`` per job: its output length times exp(``sigma`` x N(0, 1)),
    rounded, at least 1: a stand-in for a length predictor whose error is log-normal (``sigma`` 0:
    exact). Real predictors are worse on some prompts than others; this one errs alike on all."""
    if sigma < 0:
        raise ValueError("sigma must be >= 0")
    rng = np.random.default_rng([seed, 1])
    noise = np.exp(sigma * rng.standard_normal(len(trace)))
    return [{**j, "length_hint": max(1, int(round(j["output_len"] * z)))} for j, z in zip(trace, noise)]


def write_jsonl(path: str, jobs: list[dict]) -> None:
    with open(path, "w") as f:
        for j in jobs:
            f.write(json.dumps(j) + "\n")


def read_jsonl(path: str) -> list[dict]:
    jobs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                j = json.loads(line)
                jobs.append({"arrival": float(j["arrival"]), "prompt_len": int(j["prompt_len"]),
                             "output_len": int(j["output_len"]), **({"prompt": j["prompt"]} if "prompt" in j else {}),
                             **({"length_hint": int(j["length_hint"])} if "length_hint" in j else {})})
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: bad trace line ({e}); want arrival, prompt_len, output_len") from e
    return jobs

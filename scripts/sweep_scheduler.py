"""Sweep MLFQ vs FCFS vs oracle SRPT on the simulator: load x burstiness x length mix x memory.

usage: python scripts/sweep_scheduler.py [--smoke] [--jobs 800] [--seed 0 | --seeds 0 1 2] [--procs 2]
           [--output benchmarks/results/sweep_scheduler.json] [--plots benchmarks/results/sweep]
Every cell uses the policies' DEFAULT parameters (one parameter set for all cells; the simulator's
``SchedulerConfig`` defaults), the GPU cost model of ``gen_trace.py`` (fitted on an H200) and max_batch 32.
Per cell: avg / p50 / p95 / p99 JCT, avg TTFT, swap pages per policy, the ratios MLFQ/FCFS and
MLFQ/oracle, the TTFT of a prefill-first reference (``scheduler/ttft_ref.py``; ``targets`` counts
the cells where it is 5x below FCFS's: a tighter count of where the TTFT target is reachable than the
floor below), the Gittins reference over the oracle (``scheduler/gittins_ref.py``: the Gittins order,
knowing the length distribution but not each job's length; ``targets`` counts the cells where it
meets the average target, so a miss it shares is one no non-clairvoyant order fixes, and the p99
target), and the TTFT floor (every prefill alone: where FCFS is within 5x of it, no policy can
be 5x faster; ``targets`` counts those cells apart, and the cells where the oracle's p99 meets
FCFS's), and per policy the cells where it meets the average and p99 targets at once
(``avg_and_p99_in_one_cell``) and all three (``all_three_in_one_cell``; ``any_policy``: cells some
policy meets), and per mix and memory the geometric means of each policy's ratios (``geomean_by_group``). Writes the JSON (with the command line and the machine), a Markdown table next to it
(``.md``) and one heat-map PNG per metric (``<plots>_<metric>.png``: MLFQ/FCFS and MLFQ/oracle).
``--seeds 0 1 2`` pools the jobs of the three traces in every cell (``pooled_summary``: a p99 of 2,400
jobs instead of 800). ``--smoke`` runs 4 tiny cells (seconds; CI runs it in tests/scheduler/test_sweep.py).
``--base-quantum/--starve-limit/--tail-slack`` override the MLFQ defaults (for a baseline run only).
``--hint-sigma S`` gives every job a length hint (``workload.add_length_hints``: its length x exp(S N(0, 1)),
the same traces otherwise); only the MLFQ reads hints (change 11), each cell records ``hint_spearman``.
``--boost-scales 0.01 0.1 1 10`` also runs the Boost reference (``scheduler/boost_ref.py``: FCFS on arrival
times moved earlier for small jobs, knowing every size; small scales near SRPT, large near FCFS) at each
scale; the table gets the least average over the oracle's among those scales and FCFS (their limit) with
p99 no worse than FCFS's, and ``targets.boost_frontier`` counts the cells where one of them meets the
average and p99 targets together, and where any order run (a policy or a scale) meets them, or all three.
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gen_trace import GPU  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ferry.scheduler.scheduler import SchedulerConfig  # noqa: E402
from ferry.scheduler.simulator import simulate, summarize  # noqa: E402
from ferry.scheduler.workload import add_length_hints, generate  # noqa: E402

MAX_BATCH, PAGE, CHUNK, HOST_PAGES = 32, 16, 256, 1 << 16
POLICIES = ("fcfs", "mlfq", "oracle", "gittins", "ttft")
METRICS = ("avg_jct", "p99_jct", "avg_ttft")


@dataclasses.dataclass(frozen=True)
class Mix:
    name: str
    gen: dict                       # keyword arguments of workload.generate


MIXES = (
    Mix("chat_a0.8", dict(prompt_median=64, prompt_max=512, out_min=8, out_max=2048, alpha=0.8)),
    Mix("chat_a1.2", dict(prompt_median=64, prompt_max=512, out_min=8, out_max=2048, alpha=1.2)),
    Mix("chat_a2.0", dict(prompt_median=64, prompt_max=512, out_min=8, out_max=2048, alpha=2.0)),
    Mix("summarise", dict(prompt_median=1500, prompt_max=4000, out_min=8, out_max=128, alpha=1.5)),
    Mix("bimodal", dict(prompt_median=128, prompt_max=1024, out_min=8, out_max=1024, long_frac=0.1, short_max=64,
                        long_min=512)),
)
ARRIVALS = (("poisson", 1.0), ("gamma", 2.0), ("gamma", 4.0))
LOADS = (0.5, 0.7, 0.8, 0.9, 0.95)
MEMORY = ("limited", "ample")


@dataclasses.dataclass(frozen=True)
class Cell:
    mix: str
    arrival: str
    cv: float
    load: float
    memory: str

    @property
    def key(self) -> str:
        return f"{self.mix}|{self.arrival}{self.cv:g}|{self.load:g}|{self.memory}"


def pages_for(trace, memory: str) -> int:
    """"limited": KV for 0.8 x a full batch of average jobs (at least the largest job);
    "ample": a full batch of the largest jobs."""
    per = [math.ceil((j["prompt_len"] + j["output_len"]) / PAGE) for j in trace]
    if memory == "ample":
        return MAX_BATCH * max(per) + 1
    return max(max(per) + 1, round(0.8 * MAX_BATCH * sum(per) / len(per)) + 1)


def config(policy: str, pages: int, overrides: dict | None = None) -> SchedulerConfig:
    return SchedulerConfig(max_batch=MAX_BATCH, max_tokens_per_step=MAX_BATCH + CHUNK, max_prefill_chunk=CHUNK,
                           page_size=PAGE, num_device_pages=pages, num_host_pages=HOST_PAGES, policy=policy,
                           cost_model=GPU, **(overrides or {}))


def run_cell(cell: Cell, jobs: int, seed: int | tuple[int, ...], mlfq: dict | None = None,
             hint_sigma: float | None = None, boost_scales: tuple[float, ...] = ()) -> dict:
    """One cell: every policy on the trace of ``seed``, or, given a tuple of seeds, on each of their traces
    with the jobs pooled (``pooled_summary``); ``device_pages`` then lists each trace's. With
    ``boost_scales``, ``boost`` lists the Boost reference's summary at each scale (``boost_ref.py``)."""
    seeds = seed if isinstance(seed, tuple) else (seed,)
    mix = next(m for m in MIXES if m.name == cell.mix)
    traces = [generate(jobs, load=cell.load, arrival=cell.arrival, cv=cell.cv, max_batch=MAX_BATCH, cost=GPU,
                       seed=s, chunk=CHUNK, **mix.gen) for s in seeds]
    pages = [pages_for(t, cell.memory) for t in traces]
    out = {"cell": dataclasses.asdict(cell), "device_pages": pages if len(seeds) > 1 else pages[0],
           "ttft_floor": sum(ttft_floor(t) for t in traces) / len(traces)}
    if hint_sigma is not None:        # every job carries a predicted length; only the MLFQ reads it
        traces = [add_length_hints(t, hint_sigma, s) for t, s in zip(traces, seeds)]
        out["hint_spearman"] = sum(spearman([j["length_hint"] for j in t], [j["output_len"] for j in t])
                                   for t in traces) / len(traces)
    def run(pol: str, overrides: dict | None) -> dict:
        parts = [simulate(t, config(pol, n, overrides)) for t, n in zip(traces, pages)]
        s = summarize(*parts[0]) if len(parts) == 1 else pooled_summary(parts)
        s["swap_pages"] = s.get("swap_out_pages", 0) + s.get("swap_in_pages", 0)
        return s

    for pol in POLICIES:
        out[pol] = run(pol, mlfq if pol == "mlfq" else None)
    if boost_scales:
        out["boost"] = [{"scale": c} | run("boost", {"boost_scale": c}) for c in boost_scales]
    m, f, o = out["mlfq"], out["fcfs"], out["oracle"]
    out["mlfq_over_fcfs"] = {k: m[k] / f[k] for k in ("avg_jct", "p50_jct", "p95_jct", "p99_jct", "avg_ttft")}
    out["mlfq_over_oracle"] = {k: m[k] / o[k] for k in ("avg_jct", "p50_jct", "p95_jct", "p99_jct", "avg_ttft")}
    out["swap_mlfq_over_fcfs"] = m["swap_pages"] / max(f["swap_pages"], 1)
    out["gittins_over_oracle"] = {k: out["gittins"][k] / o[k] for k in ("avg_jct", "p99_jct")}
    return out


def pooled_summary(parts: list[tuple[list, dict]]) -> dict:
    """``summarize`` over the jobs of several independent traces at once (a p99 of 3 x 800 jobs is the
    24th slowest, not the 8th): percentiles and means over every job, the scheduler's counters summed,
    throughput = all tokens / the sum of each trace's span."""
    stats = {k: sum(st[k] for _, st in parts) for k, v in parts[0][1].items() if isinstance(v, (int, float))}
    s = summarize([r for res, _ in parts for r in res], stats)
    spans = [max(r.finish for r in res) - min(r.arrival for r in res) for res, _ in parts]
    s["throughput_tok_s"] = sum(r.output_len for res, _ in parts for r in res) / max(sum(spans), 1e-9)
    return s


def spearman(x: list[int], y: list[int]) -> float:
    """Rank correlation of the hints with the lengths (ties ranked by position: the bounded mixes
    have many equal lengths, so this is a little below the tie-corrected value)."""
    import numpy as np
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def ttft_floor(trace: list[dict]) -> float:
    """Mean TTFT with no queueing at all: each job's prefill alone, one ``CHUNK`` per step. No policy
    can beat it, so where FCFS's TTFT is under 5x this floor the 5x TTFT target is out of reach."""
    total = 0.0
    for j in trace:
        p = int(j["prompt_len"])
        total += sum(GPU.iteration_time(prefill_tokens=min(CHUNK, p - s), context_tokens=min(p, s + CHUNK))
                     for s in range(0, p, CHUNK))
    return total / len(trace)


def cells(smoke: bool) -> list[Cell]:
    if smoke:
        return [Cell("chat_a0.8", "gamma", 2.0, 0.8, "limited"), Cell("summarise", "poisson", 1.0, 0.7, "ample"),
                Cell("bimodal", "gamma", 4.0, 0.9, "limited"), Cell("chat_a2.0", "poisson", 1.0, 0.5, "ample")]
    return [Cell(m.name, a, cv, load, mem) for m in MIXES for mem in MEMORY for a, cv in ARRIVALS for load in LOADS]


def targets(rows: list[dict]) -> dict:
    """The issue's targets over cells at load <= 0.9: counts of cells meeting each, and the worst ratio."""
    sel = [r for r in rows if r["cell"]["load"] <= 0.9]
    hi = [r for r in sel if r["cell"]["load"] >= 0.7]
    avg = [r["mlfq_over_oracle"]["avg_jct"] for r in sel]
    p99 = [r["mlfq_over_fcfs"]["p99_jct"] for r in sel]
    ttft = [1 / r["mlfq_over_fcfs"]["avg_ttft"] for r in hi]
    reach = [r for r in hi if r["fcfs"]["avg_ttft"] >= 5 * r["ttft_floor"]]      # 5x is possible at all
    reach_ref = [r for r in hi if r["fcfs"]["avg_ttft"] >= 5 * r["ttft"]["avg_ttft"]]   # some order reaches it
    swap = [r["swap_mlfq_over_fcfs"] for r in sel if r["fcfs"]["swap_pages"] > 0]
    met = [{pol: meets_all(r, pol) for pol in POLICIES} for r in sel]     # per cell: all three targets at once
    return {
        "cells": len(sel),
        "avg_jct_within_15pct_of_oracle": {"met": sum(x <= 1.15 for x in avg), "worst_mlfq_over_oracle": max(avg),
                                           "gittins_met": sum(r["gittins_over_oracle"]["avg_jct"] <= 1.15 for r in sel),
                                           "met_where_gittins_met": sum(
                                               r["gittins_over_oracle"]["avg_jct"] <= 1.15 and x <= 1.15
                                               for r, x in zip(sel, avg))},
        "p99_no_worse_than_fcfs": {"met": sum(x <= 1.0 for x in p99), "worst_mlfq_over_fcfs": max(p99),
                                   "oracle_met": sum(r["oracle"]["p99_jct"] <= r["fcfs"]["p99_jct"] for r in sel),
                                   "gittins_met": sum(r["gittins"]["p99_jct"] <= r["fcfs"]["p99_jct"] for r in sel)},
        "ttft_5x_lower_at_load_ge_0.7": {"cells": len(hi), "met": sum(x >= 5 for x in ttft),
                                         "worst_fcfs_over_mlfq": min(ttft) if ttft else None,
                                         "reachable_cells": len(reach),
                                         "met_of_reachable": sum(r["fcfs"]["avg_ttft"] >= 5 * r["mlfq"]["avg_ttft"]
                                                                 for r in reach),
                                         "ttft_reference_met": len(reach_ref),
                                         "met_where_ttft_reference_met": sum(
                                             r["fcfs"]["avg_ttft"] >= 5 * r["mlfq"]["avg_ttft"] for r in reach_ref)},
        "swap_within_1.5x_fcfs": {"cells": len(swap), "met": sum(x <= 1.5 for x in swap),
                                  "worst_mlfq_over_fcfs": max(swap) if swap else None},
        "avg_and_p99_in_one_cell": {pol: sum(meets_avg_and_p99(r, r[pol]) for r in sel) for pol in POLICIES},
        "all_three_in_one_cell": {pol: sum(row[pol] for row in met) for pol in POLICIES} | {
            "any_policy": sum(any(row.values()) for row in met)},
        "geomean_by_group": geomean_by_group(sel),
    } | ({"boost_frontier": boost_frontier(sel)} if sel and "boost" in sel[0] else {})


def geomean(xs: list[float]) -> float | None:
    """Geometric mean of positive ratios; None for none."""
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def geomean_by_group(sel: list[dict]) -> dict:
    """Per length mix and memory ("chat_a0.8/limited"), geometric means over its cells of each policy's
    average JCT over the oracle's and p99 over FCFS's (Boost scales as "boost_<scale>" when run), and of
    FCFS's TTFT over the MLFQ's at load >= 0.7. Counts of cells move when a ratio crosses a threshold by a
    hair (a pooled p99 is the 24th slowest of 2,400 jobs); these do not, so a change that only flips ties
    shows here as none, and each group's policies place the MLFQ against what an order can reach there."""
    groups: dict[str, list[dict]] = {}
    for r in sel:
        groups.setdefault(f"{r['cell']['mix']}/{r['cell']['memory']}", []).append(r)
    out: dict[str, dict] = {}
    for group, rows in groups.items():
        summaries = {pol: [r[pol] for r in rows] for pol in POLICIES} | (
            {f"boost_{b['scale']:g}": [r["boost"][k] for r in rows] for k, b in enumerate(rows[0]["boost"])}
            if "boost" in rows[0] else {})
        out[group] = {
            "cells": len(rows),
            "avg_over_oracle": {pol: geomean([s["avg_jct"] / r["oracle"]["avg_jct"] for s, r in zip(ss, rows)])
                                for pol, ss in summaries.items()},
            "p99_over_fcfs": {pol: geomean([s["p99_jct"] / r["fcfs"]["p99_jct"] for s, r in zip(ss, rows)])
                              for pol, ss in summaries.items()},
            "fcfs_ttft_over_mlfq_at_load_ge_0.7": geomean(
                [r["fcfs"]["avg_ttft"] / r["mlfq"]["avg_ttft"] for r in rows if r["cell"]["load"] >= 0.7])}
    return out


def best_boost_avg(row: dict) -> float:
    """The lowest average JCT over the oracle's among the cell's Boost scales whose p99 is no worse than
    FCFS's, FCFS itself (the family's limit as the scale grows) included: the least average the p99 target
    costs an order between FCFS and shortest-size-first that knows every size."""
    ok = [b["avg_jct"] for b in row["boost"] if b["p99_jct"] <= row["fcfs"]["p99_jct"]]
    return min(ok + [row["fcfs"]["avg_jct"]]) / row["oracle"]["avg_jct"]


def boost_frontier(sel: list[dict]) -> dict:
    """Over cells at load <= 0.9 run with ``--boost-scales``: where some Boost scale meets the average and p99
    targets together (and all three), against the MLFQ, overall and per length mix. "Some scale" counts
    FCFS as the scale's infinite limit (``best_boost_avg``); "any order" counts every policy and scale
    (``orders``)."""
    both = [best_boost_avg(r) <= 1.15 for r in sel]
    mlfq = [meets_avg_and_p99(r, r["mlfq"]) for r in sel]
    by_mix: dict[str, dict] = {}
    for r, b, m in zip(sel, both, mlfq):
        d = by_mix.setdefault(r["cell"]["mix"], {"cells": 0, "boost_avg_and_p99": 0, "mlfq_avg_and_p99": 0})
        d["cells"] += 1
        d["boost_avg_and_p99"] += b
        d["mlfq_avg_and_p99"] += m
    return {"scales": [b["scale"] for b in sel[0]["boost"]],
            "avg_and_p99_met_by_some_scale": sum(both),
            "all_three_met_by_some_scale": sum(any(meets(r, b) for b in r["boost"] + [r["fcfs"]]) for r in sel),
            "mlfq_avg_and_p99_met": sum(mlfq),
            "mlfq_avg_and_p99_met_where_no_scale_did": sum(m and not b for b, m in zip(both, mlfq)),
            "avg_and_p99_met_by_any_order": sum(any(meets_avg_and_p99(r, s) for s in orders(r)) for r in sel),
            "all_three_met_by_any_order": sum(any(meets(r, s) for s in orders(r)) for r in sel),
            "by_mix": by_mix}


def orders(row: dict) -> list[dict]:
    """Every order the cell ran: the policies (the oracle, the Gittins and prefill-first references included)
    and each Boost scale. Where none of them meets a target, the cell's only evidence is that no order tried
    does, clairvoyant ones included."""
    return [row[pol] for pol in POLICIES] + row["boost"]


def meets_all(row: dict, policy: str) -> bool:
    """Does ``policy`` meet the issue's three targets at once in this cell: average JCT within 15% of the
    oracle's, p99 no worse than FCFS's and (at load >= 0.7) TTFT 5x below FCFS's? A cell no policy
    meets is evidence (not proof) that the targets conflict there."""
    return meets(row, row[policy])


def meets(row: dict, mine: dict) -> bool:
    """``meets_all`` for a policy's summary ``mine`` in this cell."""
    return meets_avg_and_p99(row, mine) and (row["cell"]["load"] < 0.7
                                             or row["fcfs"]["avg_ttft"] >= 5 * mine["avg_ttft"])


def meets_avg_and_p99(row: dict, mine: dict) -> bool:
    """The average target (within 15% of the oracle's) and the p99 target (no worse than FCFS's) for a
    policy's summary ``mine`` in this cell."""
    return mine["avg_jct"] <= 1.15 * row["oracle"]["avg_jct"] and mine["p99_jct"] <= row["fcfs"]["p99_jct"]


def table(rows: list[dict]) -> str:
    boost = "boost" in rows[0]
    head = ("| mix | memory | arrival | load | FCFS avg/p99 JCT | MLFQ avg/p99 JCT | oracle avg/p99 JCT | "
            "MLFQ/oracle avg | Gittins/oracle avg | MLFQ/FCFS p99 | FCFS/MLFQ TTFT | FCFS/prefill-first TTFT | "
            "FCFS TTFT/floor | MLFQ/FCFS swap |" + (" least Boost or FCFS/oracle avg at p99 <= FCFS's |" if boost else ""))
    lines = [head, "|" + "---|" * (15 if boost else 14)]
    for r in rows:
        c, f, m, o = r["cell"], r["fcfs"], r["mlfq"], r["oracle"]
        lines.append(f"| {c['mix']} | {c['memory']} | {c['arrival']} cv{c['cv']:g} | {c['load']:g} | "
                     f"{f['avg_jct']:.2f} / {f['p99_jct']:.2f} | {m['avg_jct']:.2f} / {m['p99_jct']:.2f} | "
                     f"{o['avg_jct']:.2f} / {o['p99_jct']:.2f} | {r['mlfq_over_oracle']['avg_jct']:.2f} | "
                     f"{r['gittins_over_oracle']['avg_jct']:.2f} | "
                     f"{r['mlfq_over_fcfs']['p99_jct']:.2f} | {1 / r['mlfq_over_fcfs']['avg_ttft']:.1f} | "
                     f"{f['avg_ttft'] / r['ttft']['avg_ttft']:.1f} | "
                     f"{f['avg_ttft'] / r['ttft_floor']:.1f} | "
                     f"{r['swap_mlfq_over_fcfs']:.2f} |" + (f" {best_boost_avg(r):.2f} |" if boost else ""))
    return "\n".join(lines) + "\n"


def heatmaps(rows: list[dict], prefix: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    ys = sorted({(r["cell"]["mix"], r["cell"]["memory"]) for r in rows}, key=lambda t: (t[0], t[1]))
    xs = sorted({(r["cell"]["arrival"], r["cell"]["cv"], r["cell"]["load"]) for r in rows},
                key=lambda t: (t[1], t[2]))
    paths = []
    for metric in METRICS:
        fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(xs)), 1.2 + 0.45 * len(ys)), squeeze=False)
        for ax, (ratio, label) in zip(axes[0], (("mlfq_over_fcfs", "MLFQ / FCFS"), ("mlfq_over_oracle",
                                                                                     "MLFQ / oracle"))):
            grid = np.full((len(ys), len(xs)), np.nan)
            for r in rows:
                c = r["cell"]
                grid[ys.index((c["mix"], c["memory"])), xs.index((c["arrival"], c["cv"], c["load"]))] = r[ratio][metric]
            im = ax.imshow(np.log2(grid), cmap="RdYlGn_r", vmin=-3, vmax=3, aspect="auto")
            for i in range(len(ys)):
                for j in range(len(xs)):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6)
            ax.set_xticks(range(len(xs)), [f"cv{cv:g}\n{ld:g}" for _, cv, ld in xs], fontsize=6)
            ax.set_yticks(range(len(ys)), [f"{m} {mem}" for m, mem in ys], fontsize=7)
            ax.set_title(f"{label}: {metric} (<1 = MLFQ better)", fontsize=8)
        fig.colorbar(im, ax=axes[0].tolist(), label="log2 ratio", shrink=0.8)
        path = f"{prefix}_{metric}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--jobs", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="pool the jobs of these trace seeds in every cell (overrides --seed)")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--output", default="benchmarks/results/sweep_scheduler.json")
    ap.add_argument("--plots", default=None, help="heat-map path prefix (default: the output without .json)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--base-quantum", type=float, default=None, help="MLFQ override (default: derived)")
    ap.add_argument("--starve-limit", type=float, default=None, help="MLFQ override (default: none)")
    ap.add_argument("--tail-slack", type=float, default=None, help="MLFQ override (default: SchedulerConfig's)")
    ap.add_argument("--hint-sigma", type=float, default=None,
                    help="give every job a length hint with log-normal error of this sigma (MLFQ reads it)")
    ap.add_argument("--boost-scales", type=float, nargs="+", default=(),
                    help="also run the Boost reference (scheduler/boost_ref.py) at each of these scales")
    a = ap.parse_args(argv)
    jobs = 60 if a.smoke else a.jobs
    todo = cells(a.smoke)
    mlfq = {k: v for k, v in (("base_quantum", a.base_quantum), ("starve_limit", a.starve_limit),
                              ("tail_slack", a.tail_slack)) if v is not None}
    seed = tuple(a.seeds) if a.seeds else a.seed
    t0 = time.perf_counter()
    args = ([jobs] * len(todo), [seed] * len(todo), [mlfq] * len(todo), [a.hint_sigma] * len(todo),
            [tuple(a.boost_scales)] * len(todo))
    rows = []
    with tqdm(total=len(todo), desc="sweep cells", unit="cell", disable=a.smoke) as bar:
        if a.procs > 1:
            with ProcessPoolExecutor(a.procs) as ex:
                for r in ex.map(run_cell, todo, *args):      # in order: the bar moves as the next cell is in
                    rows.append(r)
                    bar.update()
        else:
            for x in zip(todo, *args):
                rows.append(run_cell(*x))
                bar.update()
    out = {"command": "python " + " ".join([os.path.relpath(__file__)] + list(argv if argv is not None else
                                                                              sys.argv[1:])),
           "machine": f"{platform.machine()} VM, {os.cpu_count()} CPU cores, no accelerator; discrete-event "
                      f"simulator (pure Python), GPU cost model (H200 fit) {dataclasses.asdict(GPU)}",
           "python": platform.python_version(), "jobs_per_cell": jobs, "mlfq_overrides": mlfq, "hint_sigma": a.hint_sigma,
           "seed": list(seed) if isinstance(seed, tuple) else seed, "max_batch": MAX_BATCH,
           "page_size": PAGE, "chunk": CHUNK, "wall_s": round(time.perf_counter() - t0, 1),
           "targets": targets(rows), "cells": rows}
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(out, f, indent=1)
    md = os.path.splitext(a.output)[0] + ".md"
    with open(md, "w") as f:
        f.write(f"`{out['command']}` ({out['machine']})\n\n{table(rows)}\ntargets (load <= 0.9): "
                f"`{json.dumps(out['targets'])}`\n")
    if not a.no_plots:
        out["plots"] = heatmaps(rows, a.plots or os.path.splitext(a.output)[0])
    print(json.dumps(out["targets"], indent=1))
    print(f"{len(rows)} cells in {out['wall_s']} s -> {a.output}, {md}")
    return out


if __name__ == "__main__":
    main()

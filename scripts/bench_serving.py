"""Replay a trace under MLFQ / FCFS / oracle SRPT, on the simulator or the real engine; JCT statistics.

usage: python scripts/bench_serving.py --trace FILE --policy mlfq|fcfs|oracle|both|all|refs [--simulate]
           --output RESULT.json [--plot CDF.png]
  simulator knobs: --max-batch 32 --num-pages 400 --host-pages 4096 --page-size 16 --cost-model gpu|cpu|FILE
                   or --like-engine (the engine's own scheduler settings for --max-batch/--max-model-len)
                   --time-scale S (clock seconds per cost-model second) or --calibrate-to ENGINE.json
  real engine:     --model (default: SmolLM2) --max-batch 8 --max-model-len 1024 --num-pages N ...
                   [--baseline-rev REV: the same replay with the engine at git revision REV, in the same run]
                   [--repeats N: every policy N times, interleaved, a fresh engine each time]
Writes avg/p50/p95/p99 JCT, avg TTFT, throughput and the scheduler counters per policy; with
``both`` (FCFS + MLFQ) also the FCFS/MLFQ ratios; with ``all`` (simulator only: adds the oracle SRPT,
which knows every output length) every policy's ratios over FCFS and over the oracle; ``refs`` (simulator
only) adds the Gittins reference (knows the output-length distribution, not each length) and the
prefill-first TTFT reference to those three (``scheduler/policies.py``).
``--base-quantum``/``--starve-limit`` default to the derived values (scheduler/mlfq.py); give
numbers for the old fixed-seconds MLFQ. Real mode forces exact output
lengths (ignore_eos) and submits jobs at their trace arrival times (wall clock).
``--calibrate-to ENGINE.json`` (simulator): the clock fitted to that engine run on FCFS
(``engine_vs_sim.py``; ``--clock-by-kind`` per kind of dispatch), then every policy on that clock and,
per metric, whether the simulator picks the same FCFS-vs-MLFQ winner as the engine (``agreement``;
with an engine result of ``--repeats`` N > 1 also whether the simulator's ratio lies within the
engine's runs). Every engine run records ``dispatches``, its per-kind dispatch profile.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ferry.scheduler.scheduler import SchedulerConfig  # noqa: E402
from ferry.scheduler.simulator import ClockScale, JobResult, simulate, summarize  # noqa: E402
from ferry.scheduler.workload import read_jsonl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_vs_sim import agreement, dispatch_log, dispatch_profile, fit_clock  # noqa: E402


def run_sim(trace, policy, a, time_scale=None, quiet=False):
    from gen_trace import cost_model
    if a.like_engine:                  # the engine's own scheduler settings for this batch and length
        from ferry.engine.config import EngineConfig
        eng = EngineConfig(max_batch=a.max_batch, max_model_len=a.max_model_len)
        cfg = dataclasses.replace(eng.scheduler_config(a.num_pages, a.host_pages), policy=policy,
                                  base_quantum=a.base_quantum, starve_limit=a.starve_limit, tail_slack=a.tail_slack)
    else:
        cfg = SchedulerConfig(max_batch=a.max_batch, max_tokens_per_step=a.max_batch + a.chunk,
                              max_prefill_chunk=a.chunk, page_size=a.page_size, num_device_pages=a.num_pages,
                              num_host_pages=a.host_pages, policy=policy, cost_model=cost_model(a.cost_model),
                              base_quantum=a.base_quantum, starve_limit=a.starve_limit, tail_slack=a.tail_slack)
    t = time.perf_counter()
    res, stats = simulate(trace, cfg, time_scale=a.time_scale if time_scale is None else time_scale)
    if not quiet:
        print(f"  simulated {len(trace)} jobs in {time.perf_counter() - t:.1f} s", flush=True)
    return res, stats


def calibrate(trace, a) -> dict:
    """``engine_vs_sim.fit_clock`` to the engine result in ``a.calibrate_to``, simulating FCFS with ``a``."""
    with open(a.calibrate_to) as f:
        engine = json.load(f)
    if "fcfs" not in engine or engine.get("mode") != "engine":
        raise SystemExit(f"--calibrate-to {a.calibrate_to}: needs a real-engine result with FCFS (--policy both)")

    def fcfs_avg_jct(clock: ClockScale) -> float:
        res, _ = run_sim(trace, "fcfs", a, time_scale=clock, quiet=True)
        return sum(r.jct for r in res) / len(res)

    try:
        cal = fit_clock(engine, fcfs_avg_jct, by_kind=bool(a.clock_by_kind))
    except ValueError as e:
        raise SystemExit(f"--clock-by-kind: {a.calibrate_to}: {e}")
    print(f"calibrated: clock {cal['clock']} (simulated FCFS avg JCT {cal['sim_fcfs_avg_jct']:.3f} s, "
          f"engine {cal['engine_fcfs_avg_jct']:.3f} s)")
    return {"engine_result": a.calibrate_to, **cal}


def mean_summary(runs: list[dict]) -> dict:
    """Each statistic's mean over runs (percentiles too: the mean of the runs' p99, not a pooled p99)."""
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}


def run_real(trace, policy, a):
    from ferry.engine.entrypoints.llm import LLM
    kw = dict(max_batch=a.max_batch, max_model_len=a.max_model_len, scheduler=policy)
    if a.base_quantum is not None:
        kw.update(mlfq_base_quantum=a.base_quantum)
    if a.starve_limit is not None:
        kw.update(mlfq_starve_limit=a.starve_limit)
    if a.num_pages:
        kw.update(num_pages=a.num_pages, num_host_pages=a.host_pages)
    llm = LLM(a.model, **kw)
    log = dispatch_log(llm.engine)
    rows = llm.replay(trace)
    res = [JobResult(j["arrival"], r["first_token"], r["finish"], j["prompt_len"], j["output_len"])
           for j, r in zip(trace, rows)]
    stats = dict(llm.engine.stats())
    stats["dispatches"] = dispatch_profile(log)
    return res, stats


def run_baseline(a, policies):
    """The same replay with the engine at ``a.baseline_rev`` (a temporary git worktree, run as a
    subprocess with that revision's own bench_serving.py); returns its per-policy summaries."""
    import subprocess
    import tempfile
    from baseline import worktree
    res_path = os.path.join(tempfile.mkdtemp(prefix="ferry-baseline-out-"), "baseline.json")
    print(f"baseline {a.baseline_rev}:", flush=True)
    with worktree(a.baseline_rev) as wt:
        cmd = [sys.executable, os.path.join(wt, "scripts", "bench_serving.py"), "--trace", os.path.abspath(a.trace),
               "--policy", a.policy, "--output", res_path, "--max-batch", str(a.max_batch),
               "--max-model-len", str(a.max_model_len)]
        for flag, v in (("--model", a.model), ("--num-pages", a.num_pages), ("--host-pages", a.host_pages),
                        ("--base-quantum", a.base_quantum), ("--starve-limit", a.starve_limit)):
            if v is not None:
                cmd += [flag, str(v)]
        subprocess.run(cmd, cwd=wt, env=dict(os.environ, PYTHONPATH=wt), check=True, timeout=7200)
        with open(res_path) as f:
            base = json.load(f)
    return {"rev": a.baseline_rev, **{p: base[p] for p in policies}}


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results.items():
        jct = np.sort([r.jct for r in res])
        ax.plot(jct, np.arange(1, len(jct) + 1) / len(jct), label=name.upper())
    ax.set_xscale("log")
    ax.set_xlabel("job completion time (s)")
    ax.set_ylabel("CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


_SIM_ONLY = {"chunk": 256, "page_size": 16, "cost_model": "gpu", "time_scale": 1.0,   # flags the real engine
             "calibrate_to": None, "clock_by_kind": None}                             # mode does not use


def _refuse_ignored_flags(ap, a):
    """Real mode: error on flags it would ignore (so no result records a setting that had no effect);
    then fill in the simulator defaults. Engine-mode results do not record the simulator-only keys."""
    if not a.simulate:
        ignored = [f"--{k.replace('_', '-')}" for k in _SIM_ONLY if getattr(a, k) is not None]
        if a.host_pages is not None and a.num_pages is None:
            ignored.append("--host-pages (without --num-pages)")
        if ignored:
            ap.error(f"{', '.join(ignored)}: the real engine mode would ignore this; simulator-only flags need "
                     "--simulate, and the engine takes --host-pages only together with --num-pages")
    for k, v in _SIM_ONLY.items():
        if getattr(a, k) is None and a.simulate:
            setattr(a, k, v)
    if a.host_pages is None and (a.simulate or a.num_pages is not None):
        a.host_pages = 4096


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--policy", choices=["mlfq", "fcfs", "oracle", "both", "all", "refs"], default="both")
    ap.add_argument("--simulate", action="store_true")
    ap.add_argument("--output", required=True)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=None, help="simulator only (default 256)")
    ap.add_argument("--page-size", type=int, default=None, help="simulator only (default 16)")
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--host-pages", type=int, default=None, help="default 4096; the real engine uses it only "
                                                                   "with --num-pages")
    ap.add_argument("--cost-model", default=None, help="simulator only: gpu (fitted on an H200), cpu "
                                                       "(measured) or a fitted JSON file (default gpu)")
    ap.add_argument("--base-quantum", type=float, default=None, help="fixed Q0 seconds (default: derived)")
    ap.add_argument("--starve-limit", type=float, default=None, help="s without running -> Q0 (default: none)")
    ap.add_argument("--tail-slack", type=float, default=2.0)
    ap.add_argument("--like-engine", action="store_true",
                    help="simulator: the scheduler settings the real engine derives for --max-batch/--max-model-len "
                         "(its CPU cost model padded to its buckets, its chunk and step size); no --cost-model, "
                         "--chunk or --page-size")
    ap.add_argument("--time-scale", type=float, default=None,
                    help="simulator: clock seconds per cost-model second (default 1; the scheduler still charges "
                         "cost-model seconds, as the engine's does)")
    ap.add_argument("--calibrate-to", default=None,
                    help="simulator: fit --time-scale so FCFS's average JCT equals this real-engine result's")
    ap.add_argument("--clock-by-kind", action="store_true", default=None,
                    help="with --calibrate-to: scale each kind of dispatch by the engine's measured wall/model ratio "
                         "(needs an engine result with a dispatch profile), the fitted factor on top")
    ap.add_argument("--repeats", type=int, default=1,
                    help="real engine: replay every policy N times, interleaved (fcfs, mlfq, fcfs, ...), a fresh "
                         "engine each time; each policy's statistics are the means over runs, every run under 'runs'")
    ap.add_argument("--baseline-rev", default=None, help="real engine: also replay the trace with the engine "
                                                         "at this git revision (a worktree), in the same run")
    a = ap.parse_args()
    if a.like_engine and (not a.simulate or a.cost_model or a.chunk or a.page_size):
        ap.error("--like-engine needs --simulate and takes the engine's cost model, chunk and page size")
    _refuse_ignored_flags(ap, a)
    if a.like_engine:
        a.cost_model = "the engine's (--like-engine)"      # recorded in the result, not the simulator default
    if a.calibrate_to and a.time_scale != 1.0:
        ap.error("--calibrate-to fits the time scale: no --time-scale with it")
    if a.time_scale is not None and a.time_scale <= 0:
        ap.error("--time-scale must be > 0")
    if a.repeats < 1 or (a.repeats > 1 and (a.simulate or a.baseline_rev)):
        ap.error("--repeats needs N >= 1; N > 1 only for the real engine (the simulator is deterministic), "
                 "not with --baseline-rev")
    trace = read_jsonl(a.trace)
    if a.simulate and a.num_pages is None:
        a.num_pages = 400
    policies = {"both": ["fcfs", "mlfq"], "all": ["fcfs", "mlfq", "oracle"],
                "refs": ["fcfs", "mlfq", "oracle", "gittins", "ttft"]}.get(a.policy, [a.policy])
    if "oracle" in policies and not a.simulate:
        ap.error("the oracle and the references know true output lengths or their distribution: simulator only "
                 "(--simulate)")
    out = {"trace": os.path.basename(a.trace), "jobs": len(trace), "mode": "simulate" if a.simulate else "engine",
           "config": {k: v for k, v in vars(a).items() if k not in ("trace", "output", "plot")
                      and (a.simulate or k not in _SIM_ONLY)}}
    if a.simulate and a.calibrate_to:
        out["calibration"] = calibrate(trace, a)
        a.time_scale = ClockScale(**out["calibration"]["clock"])
        out["config"]["time_scale"] = out["calibration"]["clock"]
    raw, runs = {}, {p: [] for p in policies}
    for r in range(a.repeats):
        for pol in policies:
            print(f"{pol}" + (f" (run {r + 1} of {a.repeats})" if a.repeats > 1 else "") + ":", flush=True)
            res, stats = (run_sim if a.simulate else run_real)(trace, pol, a)
            raw[pol] = res
            s = summarize(res, stats)
            if "dispatches" in stats:
                s["dispatches"] = stats["dispatches"]
            runs[pol].append(s)
            print(f"  avg JCT {s['avg_jct']:.3f} s  p50 {s['p50_jct']:.3f}  p95 {s['p95_jct']:.3f}  "
                  f"p99 {s['p99_jct']:.3f}  TTFT {s['avg_ttft']:.3f}  {s['throughput_tok_s']:.1f} tok/s", flush=True)
    for pol in policies:
        out[pol] = runs[pol][0] if a.repeats == 1 else mean_summary(runs[pol])
    if a.repeats > 1:
        out["runs"] = runs
    keys = ("avg_jct", "p50_jct", "p95_jct", "p99_jct", "avg_ttft")
    for ref in ("fcfs", "oracle"):
        if ref in policies and a.policy in ("all", "refs"):
            out[f"over_{ref}"] = {p: {k: out[p][k] / out[ref][k] for k in keys if out[ref][k] > 0} for p in policies}
            print(f"policy / {ref.upper()}:", {p: {k: round(v, 2) for k, v in r.items()}
                                              for p, r in out[f"over_{ref}"].items()})
    if "fcfs" in policies and "mlfq" in policies:
        def ratios(f, m):
            return {k: f[k] / m[k] for k in keys if m[k] > 0}
        out["fcfs_over_mlfq"] = ratios(out["fcfs"], out["mlfq"])
        print("FCFS / MLFQ:", {k: round(v, 2) for k, v in out["fcfs_over_mlfq"].items()})
        if a.repeats > 1:
            out["fcfs_over_mlfq_runs"] = [ratios(f, m) for f, m in zip(runs["fcfs"], runs["mlfq"])]
            print("FCFS / MLFQ per run:", [{k: round(v, 2) for k, v in r.items()} for r in out["fcfs_over_mlfq_runs"]])
        cal = out.get("calibration", {})
        if cal.get("engine_fcfs_over_mlfq"):
            out["agreement"] = agreement(out["fcfs_over_mlfq"], cal["engine_fcfs_over_mlfq"],
                                         cal.get("engine_fcfs_over_mlfq_runs"))
            for flag, what in (("same_winner", "same FCFS-vs-MLFQ winner as the engine"),
                               ("within_engine_runs", "simulator within the engine's runs")):
                if all(flag in r for r in out["agreement"].values()):
                    print(f"{what}:", {k: r[flag] for k, r in out["agreement"].items()})
    out["command"] = "python scripts/bench_serving.py " + " ".join(sys.argv[1:])
    from results_io import machine
    out["machine"] = machine()
    if a.baseline_rev:
        if a.simulate:
            ap.error("--baseline-rev compares real engines (no --simulate)")
        out["baseline"] = run_baseline(a, policies)
        for pol in policies:
            b, n = out["baseline"][pol], out[pol]
            out[f"{pol}_baseline_over_now"] = {k: b[k] / n[k] for k in keys if n[k] > 0}
            out[f"{pol}_baseline_over_now"]["throughput_tok_s"] = b["throughput_tok_s"] / n["throughput_tok_s"]
            print(f"{pol}: baseline {a.baseline_rev} / now:",
                  {k: round(v, 2) for k, v in out[f"{pol}_baseline_over_now"].items()})
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    with open(a.output, "w") as fh:
        json.dump(out, fh, indent=2)
    if a.plot:
        plot(raw, a.plot)


if __name__ == "__main__":
    main()

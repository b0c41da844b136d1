"""Simulator, workloads, cost model and the benchmark scripts (pure Python, no JAX)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.scheduler import SchedulerConfig
from ferry.scheduler.simulator import simulate, summarize
from ferry.scheduler.workload import generate, read_jsonl, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# H100-like step profile (as scripts/gen_trace.py's "gpu"): batching is nearly free.
GPU = CostModel(base=0.012, per_prefill_token=4e-5, per_decode_row=1e-4, per_context_token=2e-8, per_swap_page=2e-5)


def _cfg(policy, **kw):
    base = dict(max_batch=16, max_tokens_per_step=16 + 256, max_prefill_chunk=256, page_size=16,
                num_device_pages=300, num_host_pages=2048, policy=policy, cost_model=GPU, base_quantum=0.4,
                starve_limit=10.0)
    base.update(kw)
    return SchedulerConfig(**base)


def test_simulator_handles_ten_thousand_jobs():
    trace = generate(10_000, load=0.8, max_batch=16, seed=3, out_max=256)
    cfg = SchedulerConfig(max_batch=16, max_tokens_per_step=272, max_prefill_chunk=256, page_size=16,
                          num_device_pages=1024, num_host_pages=1024, policy="mlfq")
    res, stats = simulate(trace, cfg)
    s = summarize(res, stats)
    assert s["jobs"] == 10_000 and s["p99_jct"] >= s["p50_jct"] > 0
    assert stats["device_pages_used"] == 0 and stats["host_pages_used"] == 0


def test_simulation_is_deterministic_and_respects_the_cost_model():
    trace = generate(300, load=0.85, max_batch=16, cost=GPU, seed=5, out_max=512)
    a, sa = simulate(trace, _cfg("mlfq"))
    b, sb = simulate(trace, _cfg("mlfq"))
    assert a == b and sa == sb
    for job, r in zip(trace, a):
        # one sampled token per iteration at most, and no iteration is cheaper than the base cost
        assert r.jct >= job["output_len"] * GPU.base - 1e-9
        assert r.ttft >= GPU.prefill_time(job["prompt_len"]) - 1e-9


def test_mlfq_cuts_average_and_tail_jct_on_a_heavy_tailed_trace():
    # 0.9 load, bursty (CV 2) arrivals, Pareto outputs up to 2048 tokens; KV for ~6400 tokens on device
    trace = generate(1000, load=0.9, arrival="gamma", cv=2.0, alpha=0.8, out_max=2048, max_batch=32, cost=GPU,
                     seed=3)
    cfg = dict(max_batch=32, num_device_pages=400)
    fcfs = summarize(*simulate(trace, _cfg("fcfs", **cfg)))
    mlfq = summarize(*simulate(trace, _cfg("mlfq", **cfg)))
    assert mlfq["avg_jct"] * 2 < fcfs["avg_jct"], (mlfq, fcfs)
    assert mlfq["p95_jct"] * 1.5 < fcfs["p95_jct"], (mlfq, fcfs)
    assert mlfq["avg_ttft"] < fcfs["avg_ttft"]
    assert mlfq["demotions"] > 0 and mlfq["preemptions"] > 0 and fcfs["demotions"] == 0


def test_trace_jsonl_round_trip_and_bad_lines(tmp_path):
    jobs = [{"arrival": 0.0, "prompt_len": 3, "output_len": 4, "prompt": "hi"},
            {"arrival": 0.5, "prompt_len": 7, "output_len": 1}]
    p = tmp_path / "t.jsonl"
    write_jsonl(str(p), jobs)
    assert read_jsonl(str(p)) == jobs
    p.write_text('{"arrival": 0, "prompt_len": 3, "output_len": 4}\n{"arrival": 1, "prompt_len": 3}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_jsonl(str(p))


def test_generator_lengths_arrivals_and_load():
    n = 4000
    for arrival, cv in (("poisson", 1.0), ("gamma", 3.0)):
        t = generate(n, arrival=arrival, cv=cv, out_min=8, out_max=1024, prompt_max=512, seed=2)
        gaps = np.diff([j["arrival"] for j in t])
        assert np.all(gaps >= 0)
        got_cv = gaps.std() / gaps.mean()
        assert abs(got_cv - cv) < 0.25 * cv, (arrival, got_cv)
        outs = np.array([j["output_len"] for j in t])
        assert outs.min() >= 8 and outs.max() <= 1024 and all(4 <= j["prompt_len"] <= 512 for j in t)
        assert np.median(outs) < outs.mean() / 1.5               # heavy tail: mean far above median
    slow = generate(500, load=0.4, seed=0)
    fast = generate(500, load=0.8, seed=0)
    assert fast[-1]["arrival"] == pytest.approx(slow[-1]["arrival"] / 2, rel=1e-3)
    with pytest.raises(ValueError):
        generate(10, arrival="uniform")


def test_cost_model_fit_and_json():
    truth = CostModel(base=0.02, per_prefill_token=0.001, per_decode_row=0.003, per_context_token=1e-5,
                      per_swap_page=0.0)
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(40):
        p, r, c = int(rng.integers(0, 200)), int(rng.integers(1, 16)), int(rng.integers(0, 4000))
        samples.append({"prefill_tokens": p, "decode_rows": r, "context_tokens": c,
                        "seconds": truth.iteration_time(p, r, c)})
    fit = CostModel.fit(samples)
    for k in ("base", "per_prefill_token", "per_decode_row", "per_context_token"):
        assert getattr(fit, k) == pytest.approx(getattr(truth, k), rel=1e-6, abs=1e-12)
    assert CostModel.from_json(fit.to_json()) == fit
    assert fit.iteration_time() == 0.0


def _random_samples(truth, n=40):
    """Fresh random steps (half decode-only, half with a chunk of 1-239 tokens) timed by ``truth``. The
    chunks take turns among the 16 / 64 / 256-token buckets' ranges: with every chunk in one bucket the
    padded prefill is a constant a single base absorbs, and the single-base positive control then
    fails (drawn uniformly, 0.2% of draws did; the full suite hit one)."""
    rng = np.random.default_rng()
    ranges = ((1, 17), (17, 65), (65, 240))
    samples = []
    for i in range(n):
        p = 0 if i % 2 else int(rng.integers(*ranges[(i // 2) % len(ranges)]))
        r, c = int(rng.integers(1, 16)), int(rng.integers(0, 4000))
        samples.append({"prefill_tokens": p, "decode_rows": r, "context_tokens": c,
                        "seconds": truth.iteration_time(p, r, c)})
    return samples


def test_cost_model_pads_work_to_the_engine_buckets_and_fits_through_them():
    """A step's tokens are charged up to the step bucket (padding as prefill tokens), a decode's rows up
    to the batch bucket; a fit through the same tables recovers a bucketed truth that an unpadded
    fit cannot (positive control)."""
    truth = CostModel(base=0.02, per_prefill_token=0.001, per_decode_row=0.003, per_context_token=1e-5,
                      per_swap_page=0.0, token_buckets=(16, 64, 256), row_buckets=(1, 4, 16))
    assert truth.padded(64, 4) == (252, 4) and truth.padded(10, 0) == (16, 0) and truth.padded(0, 5) == (0, 16)
    assert truth.padded(300, 0) == (300, 0)                             # past the largest bucket: as is
    assert truth.iteration_time(62, 4) == truth.iteration_time(200, 4)   # both run in the 256-token step
    samples = _random_samples(truth)
    fit = CostModel.fit(samples, truth.token_buckets, truth.row_buckets)
    assert all(
        getattr(fit, k) == pytest.approx(getattr(truth, k), rel=1e-6, abs=1e-12)
        for k in ("base", "per_prefill_token", "per_decode_row", "per_context_token"))
    assert CostModel.from_json(fit.to_json()) == fit
    flat = CostModel.fit(samples)
    worst = max(abs(flat.iteration_time(s["prefill_tokens"], s["decode_rows"], s["context_tokens"]) - s["seconds"])
                / s["seconds"] for s in samples)
    assert worst > 0.05


def test_gen_trace_and_bench_serving_scripts(tmp_path):
    trace, out, png = tmp_path / "t.jsonl", tmp_path / "r.json", tmp_path / "cdf.png"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gen_trace.py"), str(trace), "--jobs", "120",
                    "--load", "0.85", "--out-max", "512", "--seed", "4"], check=True, capture_output=True)
    assert len(read_jsonl(str(trace))) == 120
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_serving.py"), "--trace", str(trace),
                    "--policy", "both", "--simulate", "--max-batch", "16", "--num-pages", "200",
                    "--base-quantum", "0.4", "--output", str(out), "--plot", str(png)],
                   check=True, capture_output=True)
    r = json.loads(out.read_text())
    for pol in ("fcfs", "mlfq"):
        for k in ("avg_jct", "p50_jct", "p95_jct", "p99_jct", "avg_ttft", "throughput_tok_s", "preemptions",
                  "demotions", "promotions", "swap_out_pages", "swap_in_pages"):
            assert k in r[pol], (pol, k)
        assert r[pol]["jobs"] == 120
    assert r["fcfs_over_mlfq"]["avg_jct"] > 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_serving.py"), "--trace", str(trace),
                          "--policy", "lifo", "--simulate", "--output", str(out)], capture_output=True)
    assert bad.returncode != 0


def test_bench_serving_reports_every_policy_against_fcfs_and_the_oracle(tmp_path):
    trace, out = tmp_path / "t.jsonl", tmp_path / "r.json"
    write_jsonl(str(trace), generate(150, load=0.9, arrival="gamma", cv=3.0, alpha=0.8, out_max=1024, max_batch=8,
                                     cost=GPU, seed=2))
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_serving.py"), "--trace", str(trace),
                    "--policy", "all", "--simulate", "--max-batch", "8", "--num-pages", "300", "--output", str(out)],
                   check=True, capture_output=True)
    r = json.loads(out.read_text())
    for ref in ("fcfs", "oracle"):
        for pol in ("fcfs", "mlfq", "oracle"):
            assert set(r[f"over_{ref}"][pol]) == {"avg_jct", "p50_jct", "p95_jct", "p99_jct", "avg_ttft"}
            assert r[f"over_{ref}"][pol]["p99_jct"] == pytest.approx(r[pol]["p99_jct"] / r[ref]["p99_jct"])
        assert r[f"over_{ref}"][ref]["avg_jct"] == 1.0
    # the oracle is the reference: on this heavy-tailed bursty trace it beats FCFS on average
    assert r["oracle"]["avg_jct"] < r["fcfs"]["avg_jct"]
    all_three = r
    # refs: the same three (identical: the simulator is deterministic) plus the Gittins and TTFT references
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_serving.py"), "--trace", str(trace),
                    "--policy", "refs", "--simulate", "--max-batch", "8", "--num-pages", "300", "--output", str(out)],
                   check=True, capture_output=True)
    r = json.loads(out.read_text())
    for pol in ("fcfs", "mlfq", "oracle"):
        assert r[pol]["avg_jct"] == all_three[pol]["avg_jct"] and r[pol]["p99_jct"] == all_three[pol]["p99_jct"]
    for pol in ("gittins", "ttft"):
        assert r["over_oracle"][pol]["avg_jct"] == pytest.approx(r[pol]["avg_jct"] / r["oracle"]["avg_jct"])
    assert r["ttft"]["avg_ttft"] < r["fcfs"]["avg_ttft"]          # prefill first: the TTFT reference
    assert r["gittins"]["avg_jct"] != r["mlfq"]["avg_jct"]        # a policy of its own, not the MLFQ again
    for pol in ("oracle", "refs"):
        real = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_serving.py"), "--trace",
                               str(trace), "--policy", pol, "--output", str(out)], capture_output=True, text=True)
        assert real.returncode != 0 and "simulator only" in real.stderr


def test_cost_model_fits_a_separate_decode_base_and_the_cpu_default_is_the_committed_fit():
    """Decode dispatches get their own fixed cost when the fit is asked for one; a single-base fit of
    the same samples misses (positive control). The CPU default is the committed profile's fit."""
    truth = CostModel(base=0.08, decode_base=0.03, per_prefill_token=0.002, per_decode_row=0.004,
                      per_context_token=3e-6, per_swap_page=0.0, token_buckets=(16, 64, 256), row_buckets=(1, 4, 16))
    assert truth.iteration_time(0, 1) == pytest.approx(0.03 + 0.004)
    assert truth.iteration_time(15, 1) == pytest.approx(0.08 + 0.002 * 15 + 0.004)   # 16 tokens: one bucket
    samples = _random_samples(truth)
    fit = CostModel.fit(samples, truth.token_buckets, truth.row_buckets, decode_base=True)
    for k in ("base", "decode_base", "per_prefill_token", "per_decode_row", "per_context_token"):
        assert getattr(fit, k) == pytest.approx(getattr(truth, k), rel=1e-6, abs=1e-12)
    assert CostModel.from_json(fit.to_json()) == fit
    one = CostModel.fit(samples, truth.token_buckets, truth.row_buckets)
    assert one.decode_base is None
    assert max(abs(one.iteration_time(s["prefill_tokens"], s["decode_rows"], s["context_tokens"]) - s["seconds"])
               / s["seconds"] for s in samples) > 0.05
    with open(os.path.join(ROOT, "benchmarks", "results", "cost_model_cpu_2core.json")) as f:
        committed = CostModel.from_json(f.read())
    default = CostModel.cpu_default()
    for k in ("base", "decode_base", "per_prefill_token", "per_decode_row", "per_context_token"):
        assert getattr(default, k) == pytest.approx(getattr(committed, k), rel=0.05)
    from scripts.gen_trace import GPU                       # the simulator's GPU profile: the H200 fit
    with open(os.path.join(ROOT, "benchmarks", "results", "gpu", "cost_model_llama-3-8b_nvidia_h200.json")) as f:
        h200 = CostModel.from_json(f.read())
    for k in ("base", "decode_base", "per_prefill_token", "per_decode_row", "per_context_token"):
        assert getattr(GPU, k) == pytest.approx(getattr(h200, k), rel=0.01)
    assert (GPU.token_buckets, GPU.row_buckets) == (h200.token_buckets, h200.row_buckets)


def test_multi_step_decode_credits_every_token_of_the_dispatch():
    """A K-step decode dispatch is charged K iterations and makes up to K tokens per row (stopping at
    the output length), so K = 8 finishes a lone job in the time of K = 1, in about 1/8 the dispatches."""
    trace = [{"arrival": 0.0, "prompt_len": 8, "output_len": 43}]
    one, s1 = simulate(trace, _cfg("fcfs", decode_steps=1))
    eight, s8 = simulate(trace, _cfg("fcfs", decode_steps=8))
    assert s1["iterations"] == 43 and s8["iterations"] == 1 + 6          # prefill, then 42 tokens in 6 dispatches
    assert eight[0].jct == pytest.approx(one[0].jct, rel=0.02)
    assert s8["device_pages_used"] == 0                                   # released at its 43rd token


def test_time_scale_stretches_the_clock_not_the_schedule():
    """All jobs at t=0 under FCFS: the plans do not depend on the clock, so every JCT doubles at
    time_scale 2; with arrivals spread over time the scaled run is not a plain stretch."""
    rng = np.random.default_rng()
    trace = [{"arrival": 0.0, "prompt_len": int(rng.integers(4, 200)), "output_len": int(rng.integers(1, 60))}
             for _ in range(30)]
    one, _ = simulate(trace, _cfg("fcfs"))
    two, _ = simulate(trace, _cfg("fcfs"), time_scale=2.0)
    assert [b.jct for b in two] == pytest.approx([2 * a.jct for a in one])
    spread = generate(80, load=0.9, arrival="gamma", cv=2.0, max_batch=16, cost=GPU, seed=int(rng.integers(1 << 30)))
    one, _ = simulate(spread, _cfg("fcfs"))
    two, _ = simulate(spread, _cfg("fcfs"), time_scale=2.0)
    assert np.mean([b.jct for b in two]) > 2.05 * np.mean([a.jct for a in one])   # queues grow: load 1.8
    with pytest.raises(ValueError):
        simulate(trace, _cfg("fcfs"), time_scale=0.0)


def test_bench_serving_calibration_recovers_a_known_time_scale(tmp_path):
    """A simulated run at time scale 1.7 posing as an engine result: --calibrate-to finds 1.7 and the
    same winner on every metric; engine mode refuses the simulator-only flag."""
    trace, fake, out = tmp_path / "t.jsonl", tmp_path / "engine.json", tmp_path / "r.json"
    write_jsonl(str(trace), generate(100, load=0.7, arrival="gamma", cv=2.0, alpha=0.9, out_max=512, max_batch=8,
                                     cost=GPU, seed=3))
    common = [sys.executable, os.path.join(ROOT, "scripts", "bench_serving.py"), "--trace", str(trace),
              "--policy", "both", "--max-batch", "8"]
    subprocess.run(common + ["--simulate", "--num-pages", "300", "--time-scale", "1.7", "--output", str(fake)],
                   check=True, capture_output=True)
    r = json.loads(fake.read_text())
    r["mode"] = "engine"
    fake.write_text(json.dumps(r))
    subprocess.run(common + ["--simulate", "--num-pages", "300", "--calibrate-to", str(fake), "--output", str(out)],
                   check=True, capture_output=True)
    c = json.loads(out.read_text())
    assert c["calibration"]["factor"] == pytest.approx(1.7, rel=0.02) and not c["calibration"]["by_dispatch_kind"]
    assert c["config"]["time_scale"] == c["calibration"]["clock"] == {k: c["calibration"]["factor"]
                                                                        for k in ("ragged", "decode_k1", "decode_multi")}
    assert all(v["same_winner"] for v in c["agreement"].values()) and len(c["agreement"]) == 5
    real = subprocess.run(common + ["--calibrate-to", str(fake), "--output", str(out)], capture_output=True, text=True)
    assert real.returncode != 0 and "--calibrate-to" in real.stderr
    # An engine result of --repeats: the simulator's ratio is inside the runs' range or not. The ranges are
    # drawn around the calibrated simulation's own ratios: the fitted clock is 1.7 only to 2%, and a
    # discrete-event run at a slightly different clock may take other decisions (TTFT ratio 2.40 -> 2.95).
    ratios = c["fcfs_over_mlfq"]
    for scale, inside in (((0.9, 1.1), True), ((1.2, 1.3), False)):
        r["fcfs_over_mlfq_runs"] = [{k: v * f for k, v in ratios.items()} for f in scale]
        fake.write_text(json.dumps(r))
        subprocess.run(common + ["--simulate", "--num-pages", "300", "--calibrate-to", str(fake), "--output",
                                 str(out)], check=True, capture_output=True)
        agree = json.loads(out.read_text())["agreement"]
        assert all(v["within_engine_runs"] is inside for v in agree.values())
    no_profile = subprocess.run(common + ["--simulate", "--num-pages", "300", "--calibrate-to", str(fake), "--clock-by-kind",
                                          "--output", str(out)], capture_output=True, text=True)
    assert no_profile.returncode != 0 and "no dispatch profile" in no_profile.stderr
    sim = subprocess.run(common + ["--simulate", "--repeats", "2", "--output", str(out)], capture_output=True, text=True)
    assert sim.returncode != 0 and "deterministic" in sim.stderr


def test_mean_summary_averages_each_statistic_over_runs():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from bench_serving import mean_summary
    rng = np.random.default_rng()
    runs = [{"avg_jct": float(x), "p99_jct": float(y), "jobs": 10} for x, y in rng.uniform(1, 9, (3, 2))]
    m = mean_summary(runs)
    assert m["avg_jct"] == pytest.approx(np.mean([r["avg_jct"] for r in runs]))
    assert m["p99_jct"] == pytest.approx(np.mean([r["p99_jct"] for r in runs])) and m["jobs"] == 10


def test_dispatch_profile_charges_each_dispatch_the_next_step_call():
    """With dispatch-ahead a step call blocks on the previous dispatch, so each plan is timed by the next
    call; calls that plan nothing (no new plan) still time the dispatch before them. A fake clock."""
    import types
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import engine_vs_sim
    from ferry.scheduler.plan import Plan, WorkItem
    clock = [0.0]
    rng = np.random.default_rng()
    kinds = [("ragged", 8, 1), ("decode_k1", 1, 1), ("decode_multi", 1, 8)] * 4
    device = [float(x) for x in rng.uniform(0.01, 0.1, len(kinds))]       # each plan's true seconds
    eng = types.SimpleNamespace(last_plan=None, scheduler=types.SimpleNamespace(last_iteration_cost=0.0))
    calls = iter(range(len(kinds) + 1))

    def step():
        i = next(calls)
        if i > 0:
            clock[0] += device[i - 1]                     # reading the previous dispatch
        if i < len(kinds):
            _, n, k = kinds[i]
            eng.last_plan = Plan(work=(WorkItem("r", 0, n, True),), decode_steps=k)
            eng.scheduler.last_iteration_cost = device[i] / (2.0 if kinds[i][0] == "ragged" else 1.0)
        return []

    eng.step = step
    real_time = engine_vs_sim.time
    engine_vs_sim.time = types.SimpleNamespace(perf_counter=lambda: clock[0])
    try:
        log = engine_vs_sim.dispatch_log(eng)
        for _ in range(len(kinds) + 1):
            eng.step()
    finally:
        engine_vs_sim.time = real_time
    prof = engine_vs_sim.dispatch_profile(log)
    assert {k: p["dispatches"] for k, p in prof.items()} == {"ragged": 4, "decode_k1": 4, "decode_multi": 4}
    assert prof["ragged"]["wall_over_model"] == pytest.approx(2.0)          # the model halves ragged steps
    assert prof["decode_k1"]["wall_over_model"] == pytest.approx(1.0)
    assert prof["decode_multi"]["wall_s"] == pytest.approx(sum(device[2::3]))


def test_clock_scale_per_dispatch_kind_is_linear_in_each_kind():
    """All jobs at t=0 under FCFS: the plans do not depend on the clock, so the makespan is
    ragged_scale * R + decode_scale * D for the cost-model seconds R, D of each kind (both occur)."""
    from ferry.scheduler.simulator import ClockScale
    rng = np.random.default_rng()
    trace = [{"arrival": 0.0, "prompt_len": int(rng.integers(4, 300)), "output_len": int(rng.integers(2, 40))}
             for _ in range(20)]

    def makespan(r, d):
        return simulate(trace, _cfg("fcfs"), time_scale=ClockScale(ragged=r, decode_k1=d, decode_multi=d))[1]["makespan"]

    base = makespan(1.0, 1.0)
    R, D = makespan(2.0, 1.0) - base, makespan(1.0, 2.0) - base
    assert R > 0 and D > 0 and base == pytest.approx(R + D)
    assert makespan(3.0, 5.0) == pytest.approx(3 * R + 5 * D)
    with pytest.raises(ValueError):
        ClockScale(decode_k1=0.0)


def test_fcfs_dispatch_ratios_pool_the_runs_and_need_every_kind():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from engine_vs_sim import fcfs_dispatch_ratios

    def prof(w):
        return {k: {"dispatches": 1, "model_s": 1.0, "wall_s": w[i]}
                for i, k in enumerate(("ragged", "decode_k1", "decode_multi"))}
    engine = {"fcfs": {}, "runs": {"fcfs": [{"dispatches": prof((1.0, 2.0, 0.5))},
                                           {"dispatches": prof((3.0, 2.0, 1.5))}]}}
    assert fcfs_dispatch_ratios(engine) == {"ragged": 2.0, "decode_k1": 2.0, "decode_multi": 1.0}
    del engine["runs"]["fcfs"][1]["dispatches"]["decode_multi"]
    engine["runs"]["fcfs"] = engine["runs"]["fcfs"][1:]
    assert fcfs_dispatch_ratios(engine) is None                     # a kind never ran: no per-kind fit
    assert fcfs_dispatch_ratios({"fcfs": {"avg_jct": 1.0}}) is None   # an older result: no profile


def test_fit_clock_recovers_a_known_clock_one_scale_or_per_kind():
    """A simulated FCFS average JCT linear in each kind's clock scale (fresh random weights): the fitted
    clock gives back the engine's JCT; per kind it is the engine's ratios times the factor."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from engine_vs_sim import fit_clock
    rng = np.random.default_rng()
    w = dict(zip(("ragged", "decode_k1", "decode_multi"), rng.uniform(0.5, 3.0, 3)))
    ratios = dict(zip(w, rng.uniform(0.4, 1.5, 3)))
    factor = float(rng.uniform(0.5, 2.0))
    target = sum(w[k] * factor * ratios[k] for k in w)
    engine = {"fcfs": {"avg_jct": target, "dispatches": {k: {"dispatches": 1, "model_s": 1.0, "wall_s": r}
                                                         for k, r in ratios.items()}}}

    def jct(clock):
        return sum(w[k] * getattr(clock, k) for k in w)

    per_kind = fit_clock(engine, jct, by_kind=True)
    assert per_kind["factor"] == pytest.approx(factor, rel=1e-5)
    assert per_kind["clock"] == pytest.approx({k: factor * r for k, r in ratios.items()}, rel=1e-5)
    one = fit_clock(engine, jct)
    assert not one["by_dispatch_kind"] and one["factor"] == pytest.approx(target / sum(w.values()), rel=1e-5)
    assert one["sim_fcfs_avg_jct"] == pytest.approx(target, rel=1e-5)
    with pytest.raises(ValueError):
        fit_clock({"fcfs": {"avg_jct": 1.0}}, jct, by_kind=True)     # no profile: no per-kind fit

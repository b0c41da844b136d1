"""scripts/sweep_scheduler.py in smoke mode (seconds), as CI runs it."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sweep_smoke_writes_json_table_and_heatmaps(tmp_path):
    out = tmp_path / "sweep.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sweep_scheduler.py"), "--smoke", "--procs", "1",
                    "--boost-scales", "0.1", "10", "--output", str(out)], check=True, capture_output=True, cwd=ROOT)
    r = json.loads(out.read_text())
    assert "--smoke" in r["command"] and "CPU cores" in r["machine"] and "simulator" in r["machine"]
    assert len(r["cells"]) == 4
    mixes = {c["cell"]["mix"] for c in r["cells"]}
    assert {"chat_a0.8", "summarise", "bimodal"} <= mixes
    for c in r["cells"]:
        for pol in ("fcfs", "mlfq", "oracle", "gittins", "ttft"):
            assert c[pol]["jobs"] == r["jobs_per_cell"]
            assert c[pol]["p99_jct"] >= c[pol]["p50_jct"] > 0
        assert c["mlfq_over_fcfs"]["avg_jct"] == c["mlfq"]["avg_jct"] / c["fcfs"]["avg_jct"]
        assert c["mlfq_over_oracle"]["p99_jct"] == c["mlfq"]["p99_jct"] / c["oracle"]["p99_jct"]
        assert c["gittins_over_oracle"]["avg_jct"] == c["gittins"]["avg_jct"] / c["oracle"]["avg_jct"]
        assert [b["scale"] for b in c["boost"]] == [0.1, 10.0]
        assert all(b["jobs"] == r["jobs_per_cell"] for b in c["boost"])
    t = r["targets"]
    f = t["boost_frontier"]
    assert f["scales"] == [0.1, 10.0] and sum(d["cells"] for d in f["by_mix"].values()) == t["cells"]
    assert 0 <= f["all_three_met_by_some_scale"] <= f["avg_and_p99_met_by_some_scale"] <= t["cells"]
    assert f["avg_and_p99_met_by_some_scale"] <= f["avg_and_p99_met_by_any_order"] <= t["cells"]
    assert t["all_three_in_one_cell"]["any_policy"] <= f["all_three_met_by_any_order"] <= t["cells"]
    assert t["cells"] == sum(c["cell"]["load"] <= 0.9 for c in r["cells"])
    avg = t["avg_jct_within_15pct_of_oracle"]
    assert 0 <= avg["met_where_gittins_met"] <= min(avg["met"], avg["gittins_met"]) <= t["cells"]
    for pol in ("fcfs", "mlfq", "oracle", "gittins", "ttft"):
        assert t["all_three_in_one_cell"][pol] <= t["avg_and_p99_in_one_cell"][pol] <= t["cells"]
    ttft = t["ttft_5x_lower_at_load_ge_0.7"]
    assert 0 <= ttft["met_where_ttft_reference_met"] <= min(ttft["met"], ttft["ttft_reference_met"]) <= ttft["cells"]
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert sum(line.startswith("| chat") or line.startswith("| summ") or line.startswith("| bimodal")
               for line in table) == 4
    for metric in ("avg_jct", "p99_jct", "avg_ttft"):
        assert (tmp_path / f"sweep_{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_all_three_targets_in_one_cell_each_condition_counts():
    """``meets_all``: average within 15% of the oracle, p99 <= FCFS's and, at load >= 0.7 only, TTFT 5x
    below FCFS's; each condition alone can fail a policy (controls), and ``targets`` counts per policy."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import sweep_scheduler as S

    def row(load, **mlfq):
        stats = lambda avg, p99, ttft: {"avg_jct": avg, "p99_jct": p99, "avg_ttft": ttft}   # noqa: E731
        r = {"cell": {"mix": "chat", "memory": "ample", "load": load}, "fcfs": stats(2.0, 10.0, 1.0),
             "oracle": stats(1.0, 12.0, 0.1), "gittins": stats(1.1, 11.0, 0.1), "ttft": stats(3.0, 20.0, 0.05)}
        r["mlfq"] = stats(**{"avg": 1.15, "p99": 10.0, "ttft": 0.2, **mlfq})
        return r

    good = row(0.8)
    assert S.meets_all(good, "mlfq") and not S.meets_all(good, "fcfs")        # FCFS: 2x the oracle
    assert not S.meets_all(good, "oracle") and not S.meets_all(good, "ttft")  # their p99 > FCFS's
    assert not S.meets_all(row(0.8, avg=1.16), "mlfq")
    assert not S.meets_all(row(0.8, p99=10.01), "mlfq")
    assert not S.meets_all(row(0.8, ttft=0.21), "mlfq")
    assert S.meets_all(row(0.5, ttft=0.9), "mlfq")                            # no TTFT target below 0.7
    slow_first_token, gittins_tail = row(0.8, ttft=0.21), row(0.8)
    gittins_tail["gittins"]["p99_jct"] = 9.0                                   # the Gittins reference meets all three
    rows = [good, row(0.8, avg=1.16), row(0.5, ttft=0.9), row(0.95),           # 0.95: outside the targets
            slow_first_token, gittins_tail]
    for r in rows:
        r.update(mlfq_over_oracle={"avg_jct": r["mlfq"]["avg_jct"]}, mlfq_over_fcfs={
            "p99_jct": r["mlfq"]["p99_jct"] / 10.0, "avg_ttft": r["mlfq"]["avg_ttft"]},
            gittins_over_oracle={"avg_jct": 1.1}, ttft_floor=0.01, swap_mlfq_over_fcfs=0.0)
        r["fcfs"]["swap_pages"] = 0
    t = S.targets(rows)
    assert t["all_three_in_one_cell"] == {"fcfs": 0, "mlfq": 3, "oracle": 0, "gittins": 1, "ttft": 0, "any_policy": 3}
    # average and p99 alone: the MLFQ's slow first token still counts there (control: not in all three)
    assert t["avg_and_p99_in_one_cell"] == {"fcfs": 0, "mlfq": 4, "oracle": 0, "gittins": 1, "ttft": 0}
    assert t["p99_no_worse_than_fcfs"]["gittins_met"] == 1 and t["p99_no_worse_than_fcfs"]["oracle_met"] == 0


def test_geometric_means_by_group_cover_the_cells_of_each_mix_and_memory():
    """``geomean_by_group``: per mix and memory, over the cells given, every policy's average over the oracle's
    and p99 over FCFS's (Boost scales too), and FCFS's TTFT over the MLFQ's at load >= 0.7 only (control: a
    group without such a cell has none)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import sweep_scheduler as S

    def row(memory, load, avg, p99, ttft):
        stats = lambda a, p, t: {"avg_jct": a, "p99_jct": p, "avg_ttft": t}   # noqa: E731
        r = {pol: stats(1.0, 10.0, 1.0) for pol in S.POLICIES}
        r.update(cell={"mix": "chat", "memory": memory, "load": load}, mlfq=stats(avg, p99, ttft),
                 boost=[{"scale": 0.5, **stats(2 * avg, 10.0, 1.0)}])
        return r

    g = S.geomean_by_group([row("limited", 0.5, 1.0, 20.0, 1.0), row("limited", 0.8, 4.0, 5.0, 0.25),
                            row("limited", 0.9, 2.0, 10.0, 0.01), row("ample", 0.5, 1.1, 9.0, 0.5)])
    lim, amp = g["chat/limited"], g["chat/ample"]
    assert lim["cells"] == 3 and amp["cells"] == 1 and set(g) == {"chat/limited", "chat/ample"}
    assert abs(lim["avg_over_oracle"]["mlfq"] - 2.0) < 1e-12 and abs(lim["p99_over_fcfs"]["mlfq"] - 1.0) < 1e-12
    assert abs(lim["avg_over_oracle"]["boost_0.5"] - 4.0) < 1e-12 and lim["avg_over_oracle"]["fcfs"] == 1.0
    assert abs(lim["fcfs_ttft_over_mlfq_at_load_ge_0.7"] - 20.0) < 1e-9       # sqrt(4 x 100)
    assert amp["fcfs_ttft_over_mlfq_at_load_ge_0.7"] is None
    assert abs(amp["avg_over_oracle"]["mlfq"] - 1.1) < 1e-12 and abs(amp["p99_over_fcfs"]["mlfq"] - 0.9) < 1e-12


def test_ttft_floor_is_a_job_alone_and_bounds_every_policy():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import sweep_scheduler as S
    from ferry.scheduler.simulator import simulate
    alone = [{"arrival": 0.0, "prompt_len": 600, "output_len": 3}]     # three chunks: 256 + 256 + 88
    res, _ = simulate(alone, S.config("fcfs", 200))
    assert abs(res[0].ttft - S.ttft_floor(alone)) < 1e-12
    # Ten at once: queueing puts every policy above the floor (the floor does not move).
    burst = alone * 10
    floor = S.ttft_floor(burst)
    assert floor == S.ttft_floor(alone)
    for pol in ("fcfs", "mlfq", "oracle", "gittins", "ttft"):
        res, _ = simulate(burst, S.config(pol, 2000))
        assert sum(r.ttft for r in res) / len(res) > floor


def test_hint_sigma_gives_hints_only_the_mlfq_reads():
    """``--hint-sigma``: each cell records the hints' rank correlation (1 for exact hints, lower with
    error); FCFS and the oracle ignore hints (identical numbers), the MLFQ reads them (different ones on
    a cell long enough to learn from)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import sweep_scheduler as S
    cell = S.Cell("chat_a0.8", "gamma", 2.0, 0.8, "limited")
    plain, exact, noisy = (S.run_cell(cell, 200, 0, None, s) for s in (None, 0.0, 1.0))
    assert "hint_spearman" not in plain and exact["hint_spearman"] == 1.0 and 0.3 < noisy["hint_spearman"] < 0.9
    for pol in ("fcfs", "oracle"):
        assert exact[pol] == plain[pol] == noisy[pol]
    assert exact["mlfq"] != plain["mlfq"]


def test_seeds_pool_every_trace_jobs_into_one_cell():
    """``--seeds``: a cell's numbers are over the jobs of every seed's trace (percentiles of the pooled
    JCTs, counters summed), so they differ from any one seed's; one seed alone is the plain cell."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import numpy as np

    import sweep_scheduler as S
    from ferry.scheduler.simulator import simulate
    from ferry.scheduler.workload import generate
    cell = S.Cell("bimodal", "gamma", 4.0, 0.9, "limited")           # the MLFQ preempts on both traces
    one, pooled = S.run_cell(cell, 60, 1), S.run_cell(cell, 60, (1, 2))
    assert S.run_cell(cell, 60, (1,)) == one                   # one seed in a tuple: the plain cell
    mix = next(m for m in S.MIXES if m.name == cell.mix)
    parts, pages = {pol: [] for pol in ("fcfs", "mlfq")}, []
    for seed in (1, 2):
        trace = generate(60, load=cell.load, arrival=cell.arrival, cv=cell.cv, max_batch=S.MAX_BATCH, cost=S.GPU,
                         seed=seed, chunk=S.CHUNK, **mix.gen)
        pages.append(S.pages_for(trace, cell.memory))
        for pol in parts:
            parts[pol].append(simulate(trace, S.config(pol, pages[-1])))
    jct = [r.jct for res, _ in parts["fcfs"] for r in res]
    f = pooled["fcfs"]
    assert f["jobs"] == 120 and f["p99_jct"] == float(np.percentile(jct, 99)) and f["avg_jct"] == float(np.mean(jct))
    assert f["iterations"] == sum(st["iterations"] for _, st in parts["fcfs"])
    assert all(st["preemptions"] > 0 for _, st in parts["mlfq"])
    assert pooled["mlfq"]["preemptions"] == sum(st["preemptions"] for _, st in parts["mlfq"])
    assert pooled["device_pages"] == pages
    assert pooled["fcfs"]["p99_jct"] != one["fcfs"]["p99_jct"]

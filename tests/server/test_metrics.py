"""/metrics through prometheus_client: names, labels, per-queue gauges and histogram buckets, read at scrape time."""
from prometheus_client.parser import text_string_to_metric_families

from ferry.engine.entrypoints.latency import LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, LatencyRecorder
from ferry.engine.server.metrics import make_registry, render_prometheus

STATS = {"running": 3, "swapped": 1, "preempted": 0, "in_flight": 5, "device_pages_used": 40,
         "device_pages_total": 64, "host_pages_used": 8, "host_pages_total": 64, "preemptions": 7,
         "demotions": 4, "promotions": 1, "swap_out_pages": 12, "swap_in_pages": 4, "swap_out_pages_saved": 9, "swap_in_pages_saved": 3,
         "recomputes": 0,
         "prompt_tokens_total": 1000, "generation_tokens_total": 250, "rejected_total": 2, "step_errors_total": 0,
         "waiting_q0": 2, "waiting_q1": 0, "waiting_q2": 5, "waiting_q3": 1,
         "finished_by_reason": {"stop": 6, "length": 3}, "not_a_metric": "text", "flag": True}


def _samples(text):
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _recorder():
    rec = LatencyRecorder()
    for v in (0.003, 0.3, 0.3, 7.0, 1000.0):
        rec.ttft.observe(v)
    rec.itl.observe(0.015, times=10)
    rec.jct.observe(2.0)
    return rec


def test_names_values_and_labels():
    s = _samples(render_prometheus(STATS, _recorder().snapshot(), labels={"model": "m"}))
    m = (("model", "m"),)
    for key, name in (("running", "requests_running"), ("in_flight", "requests_in_flight"),
                      ("device_pages_used", "device_pages_used"), ("preemptions", "preemptions_total"),
                      ("swap_out_pages", "swap_out_pages_total"), ("rejected_total", "requests_rejected_total"),
                      ("swap_out_pages_saved", "swap_out_pages_saved_total"),
                      ("swap_in_pages_saved", "swap_in_pages_saved_total"),
                      ("step_errors_total", "engine_step_errors_total"),
                      ("generation_tokens_total", "generation_tokens_total")):
        assert s[(f"ferry_{name}", m)] == STATS[key], name
    for q, n in enumerate((2, 0, 5, 1)):                       # one MLFQ gauge per queue
        assert s[("ferry_requests_waiting", (("model", "m"), ("queue", str(q))))] == n
    assert s[("ferry_requests_finished_total", (("finish_reason", "stop"), ("model", "m")))] == 6
    assert not any("not_a_metric" in k[0] or "flag" in k[0] for k in s)   # non-numbers and bools skipped


def test_histograms_keep_their_buckets_and_counts():
    s = _samples(render_prometheus(STATS, _recorder().snapshot(), labels={"model": "m"}))
    for name, bounds, count, total in (("time_to_first_token_seconds", LATENCY_BUCKETS, 5, 1007.603),
                                       ("inter_token_latency_seconds", TOKEN_LATENCY_BUCKETS, 10, 0.15),
                                       ("request_completion_seconds", LATENCY_BUCKETS, 1, 2.0)):
        buckets = {k[1][0][1]: v for k, v in s.items() if k[0] == f"ferry_{name}_bucket"}
        assert [float(le) for le in buckets] == [*bounds, float("inf")]
        assert list(buckets.values()) == sorted(buckets.values()) and buckets["+Inf"] == count
        assert s[(f"ferry_{name}_count", (("model", "m"),))] == count
        assert abs(s[(f"ferry_{name}_sum", (("model", "m"),))] - total) < 1e-9
    ttft = {float(k[1][0][1]): v for k, v in s.items() if k[0] == "ferry_time_to_first_token_seconds_bucket"}
    assert (ttft[0.005], ttft[0.25], ttft[0.5], ttft[5.0], ttft[10.0], ttft[300.0]) == (1, 1, 3, 3, 4, 4)


def test_fcfs_single_queue_and_missing_keys():
    s = _samples(render_prometheus({"waiting": 3, "running": 1}, {}))
    assert s[("ferry_requests_waiting", (("queue", "0"),))] == 3 and s[("ferry_requests_running", ())] == 1
    assert not any(k[0].startswith("ferry_preemptions") for k in s)


def test_registry_reads_the_snapshot_at_each_scrape():
    from prometheus_client import generate_latest
    state = {"running": 1}
    reg = make_registry(lambda: dict(state), lambda: {}, labels={"model": "x"})
    assert _samples(generate_latest(reg).decode())[("ferry_requests_running", (("model", "x"),))] == 1
    state["running"] = 9
    assert _samples(generate_latest(reg).decode())[("ferry_requests_running", (("model", "x"),))] == 9

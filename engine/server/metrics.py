"""``GET /metrics``: the engine's stats snapshot and latency histograms through ``prometheus_client``.

``EngineCollector`` is a custom collector: at scrape time it reads one stats snapshot
(``AsyncEngine.stats()``) and the latency histogram snapshots (``AsyncEngine.latency()``)
and yields metric families; prometheus_client writes the exposition format. The engine
loop keeps its own counters (the scheduler's, read as one snapshot), so nothing is
mirrored into prometheus_client objects on the hot path. Each app has its own
``CollectorRegistry`` (several engines in one process never clash in the global one).
"""
from __future__ import annotations

import numbers
from typing import Callable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.utils import floatToGoString

from ferry.engine.entrypoints.latency import HistogramSnapshot

# What /metrics answers with: text format 0.0.4, which every Prometheus version scrapes.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# (stats key, metric name, type, help). Counter names end in _total, as exposed.
_SCALARS = (
    ("running", "requests_running", "gauge", "Requests in the running batch."),
    ("swapped", "requests_swapped", "gauge", "Requests whose KV cache is in host memory."),
    ("preempted", "requests_preempted", "gauge", "Requests preempted and not yet resumed."),
    ("in_flight", "requests_in_flight", "gauge", "Requests admitted by the async engine and not finished."),
    ("device_pages_used", "device_pages_used", "gauge", "KV cache pages in use on the device."),
    ("device_pages_total", "device_pages_total", "gauge", "KV cache pages on the device."),
    ("host_pages_used", "host_pages_used", "gauge", "KV cache pages in use in host memory."),
    ("host_pages_total", "host_pages_total", "gauge", "KV cache pages in host memory."),
    ("preemptions", "preemptions_total", "counter", "Preemptions of running requests."),
    ("demotions", "demotions_total", "counter", "MLFQ demotions to a lower-priority queue."),
    ("promotions", "promotions_total", "counter", "Starvation-guard promotions to the top queue."),
    ("swap_out_pages", "swap_out_pages_total", "counter", "KV pages copied device -> host."),
    ("swap_in_pages", "swap_in_pages_total", "counter", "KV pages copied host -> device."),
    ("swap_out_pages_saved", "swap_out_pages_saved_total", "counter",
     "KV pages a swap-out did not copy: the host still held them from the request's last swap-in."),
    ("swap_in_pages_saved", "swap_in_pages_saved_total", "counter",
     "KV pages a swap-in did not copy: still intact in the device pages the request left."),
    ("recomputes", "recomputes_total", "counter", "Requests whose KV was dropped, to be recomputed."),
    ("prompt_tokens_total", "prompt_tokens_total", "counter", "Prompt tokens processed."),
    ("generation_tokens_total", "generation_tokens_total", "counter", "Tokens generated."),
    ("rejected_total", "requests_rejected_total", "counter", "Requests refused because the waiting room was full."),
    ("step_errors_total", "engine_step_errors_total", "counter", "Engine steps that raised an exception."),
)
_HISTOGRAMS = (
    ("ttft", "time_to_first_token_seconds", "Time from arrival to the first generated token."),
    ("itl", "inter_token_latency_seconds", "Time between consecutive generated tokens of a request."),
    ("jct", "request_completion_seconds", "Job completion time: arrival to last token (aborts excluded)."),
)


class EngineCollector:
    """Collector over ``stats()`` and ``histograms()`` snapshots, read at every scrape.

    Missing stats keys are skipped, so engines with fewer counters still export. Waiting
    requests are one gauge with a ``queue`` label per scheduler queue (MLFQ: one per
    queue, 0 = highest priority; FCFS: one). ``labels`` (e.g. ``{"model": name}``) are
    attached to every sample.
    """

    def __init__(self, stats: Callable[[], Mapping], histograms: Callable[[], Mapping[str, HistogramSnapshot]],
                 prefix: str = "ferry", labels: Mapping[str, str] | None = None):
        self._stats, self._histograms, self.prefix = stats, histograms, prefix
        self._names = list((labels or {}).keys())
        self._values = [str(v) for v in (labels or {}).values()]

    def collect(self):
        stats = self._stats()
        p, names, values = self.prefix, self._names, self._values
        for key, name, kind, help_ in _SCALARS:
            if _is_number(stats.get(key)):
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                fam = cls(f"{p}_{name}", help_, labels=names)
                fam.add_metric(values, float(stats[key]))
                yield fam
        waiting = _waiting_per_queue(stats)
        if waiting is not None:
            fam = GaugeMetricFamily(f"{p}_requests_waiting",
                                    "Requests waiting, per scheduler queue (0 = highest priority).",
                                    labels=names + ["queue"])
            for q, n in enumerate(waiting):
                fam.add_metric(values + [str(q)], float(n))
            yield fam
        finished = stats.get("finished_by_reason")
        if finished:
            fam = CounterMetricFamily(f"{p}_requests_finished_total", "Requests finished, by finish reason.",
                                      labels=names + ["finish_reason"])
            for reason, n in sorted(finished.items()):
                fam.add_metric(values + [str(reason)], float(n))
            yield fam
        snaps = self._histograms()
        for key, name, help_ in _HISTOGRAMS:
            snap = snaps.get(key)
            if snap is None:
                continue
            fam = HistogramMetricFamily(f"{p}_{name}", help_, labels=names)
            fam.add_metric(values, [(floatToGoString(le), n) for le, n in snap.cumulative()], snap.total)
            yield fam


def make_registry(stats: Callable[[], Mapping], histograms: Callable[[], Mapping[str, HistogramSnapshot]],
                  prefix: str = "ferry", labels: Mapping[str, str] | None = None) -> CollectorRegistry:
    """A registry holding one ``EngineCollector``; ``generate_latest(registry)`` renders a scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(stats, histograms, prefix, labels))
    return registry


def render_prometheus(stats: Mapping, histograms: Mapping[str, HistogramSnapshot],
                      prefix: str = "ferry", labels: Mapping[str, str] | None = None) -> str:
    """One snapshot as Prometheus text (format 0.0.4), e.g. for logging or tests."""
    return generate_latest(make_registry(lambda: stats, lambda: histograms, prefix, labels)).decode()


def _waiting_per_queue(stats: Mapping) -> list | None:
    waiting = stats.get("waiting_per_queue")
    if waiting is None:           # scheduler stats: waiting_q0..waiting_qK (MLFQ) or waiting (FCFS)
        qs = sorted((int(k[9:]), v) for k, v in stats.items() if k.startswith("waiting_q") and k[9:].isdigit())
        waiting = [v for _, v in qs] or ([stats["waiting"]] if _is_number(stats.get("waiting")) else None)
    return waiting


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)

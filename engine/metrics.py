"""Serving metrics: latency histograms and Prometheus text rendering.

No prometheus_client dependency: the exposition format (text 0.0.4) is
written by hand. ``LatencyRecorder`` is fed every ``RequestOutput`` by the
engine loop thread; ``render_prometheus`` turns an engine stats snapshot plus
histogram snapshots into the text served at ``GET /metrics``.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import numbers
import threading
from typing import Mapping

from engine.outputs import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


@dataclasses.dataclass(frozen=True)
class HistogramSnapshot:
    """Immutable copy of a histogram: per-bucket counts (last one is +Inf), sum, count."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float
    count: int

    def cumulative(self) -> list[tuple[str, int]]:
        """(le label, cumulative count) pairs, ending with "+Inf"."""
        out, acc = [], 0
        for bound, c in zip(self.bounds + (math.inf,), self.counts):
            acc += c
            out.append(("+Inf" if bound == math.inf else _fmt(bound), acc))
        return out


class Histogram:
    """A thread-safe fixed-bucket histogram."""

    def __init__(self, bounds: tuple[float, ...]):
        self._bounds = tuple(sorted(bounds))
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def observe(self, value: float, times: int = 1) -> None:
        """Record ``value`` ``times`` times (negative values are clamped to 0)."""
        value = max(0.0, float(value))
        idx = bisect.bisect_left(self._bounds, value)
        with self._lock:
            self._counts[idx] += times
            self._sum += value * times
            self._count += times

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            return HistogramSnapshot(self._bounds, tuple(self._counts), self._sum, self._count)


class LatencyRecorder:
    """Time to first token, inter-token latency and job completion time.

    ``observe(output, now)`` must be called by one thread (the engine loop) for
    every output in order; ``snapshot()`` may be called from any thread.
    """

    def __init__(self):
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.itl = Histogram(TOKEN_LATENCY_BUCKETS)
        self.jct = Histogram(LATENCY_BUCKETS)
        self._last_token_time: dict[str, float] = {}

    def observe(self, out: RequestOutput, now: float) -> None:
        rid = out.request_id
        new = len(out.delta_token_ids)
        last = self._last_token_time.get(rid)
        if new:
            if last is None:
                first = out.timings.first_token or now
                self.ttft.observe(first - out.timings.arrival)
                if new > 1:
                    self.itl.observe((now - first) / (new - 1), new - 1)
            else:
                self.itl.observe((now - last) / new, new)
            self._last_token_time[rid] = now
        if out.finished:
            self._last_token_time.pop(rid, None)
            if out.finish_reason != "abort":
                self.jct.observe((out.timings.finish or now) - out.timings.arrival)

    def forget(self, request_id: str) -> None:
        """Drop per-request state of a request that ended without a final output."""
        self._last_token_time.pop(request_id, None)

    def snapshot(self) -> dict[str, HistogramSnapshot]:
        return {"ttft": self.ttft.snapshot(), "itl": self.itl.snapshot(), "jct": self.jct.snapshot()}


# (stats key, metric name, type, help)
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


def render_prometheus(stats: Mapping, histograms: Mapping[str, HistogramSnapshot],
                      prefix: str = "ferry", labels: Mapping[str, str] | None = None) -> str:
    """Render a stats snapshot and latency histograms as Prometheus text (format 0.0.4).

    Missing stats keys are skipped, so engines with fewer counters still render.
    ``labels`` (e.g. ``{"model": name}``) are attached to every sample.
    """
    base = dict(labels or {})
    lines: list[str] = []

    def family(name: str, kind: str, help_: str) -> str:
        full = f"{prefix}_{name}"
        lines.append(f"# HELP {full} {help_}")
        lines.append(f"# TYPE {full} {kind}")
        return full

    for key, name, kind, help_ in _SCALARS:
        if _is_number(stats.get(key)):
            full = family(name, kind, help_)
            lines.append(f"{full}{_labels(base)} {_fmt(stats[key])}")
    waiting = stats.get("waiting_per_queue")
    if waiting is None:           # scheduler stats: waiting_q0..waiting_qK (MLFQ) or waiting (FCFS)
        qs = sorted((int(k[9:]), v) for k, v in stats.items() if k.startswith("waiting_q") and k[9:].isdigit())
        waiting = [v for _, v in qs] or ([stats["waiting"]] if _is_number(stats.get("waiting")) else None)
    if waiting is not None:
        full = family("requests_waiting", "gauge", "Requests waiting, per scheduler queue (0 = highest priority).")
        for q, n in enumerate(waiting):
            lines.append(f"{full}{_labels({**base, 'queue': str(q)})} {_fmt(n)}")
    finished = stats.get("finished_by_reason")
    if finished:
        full = family("requests_finished_total", "counter", "Requests finished, by finish reason.")
        for reason, n in sorted(finished.items()):
            lines.append(f"{full}{_labels({**base, 'finish_reason': str(reason)})} {_fmt(n)}")
    for key, name, help_ in _HISTOGRAMS:
        snap = histograms.get(key)
        if snap is None:
            continue
        full = family(name, "histogram", help_)
        for le, c in snap.cumulative():
            lines.append(f"{full}_bucket{_labels({**base, 'le': le})} {c}")
        lines.append(f"{full}_sum{_labels(base)} {_fmt(snap.total)}")
        lines.append(f"{full}_count{_labels(base)} {snap.count}")
    return "\n".join(lines) + "\n"


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, numbers.Integral):
        return str(int(v))
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + body + "}"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

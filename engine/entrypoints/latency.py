"""Latency histograms fed by the engine loop: time to first token, inter-token, completion.

``LatencyRecorder`` is fed every ``RequestOutput`` by the engine loop thread;
``snapshot()`` is read by ``AsyncEngine.latency()`` and, through it, by the server's
``/metrics``, whose prometheus_client collector turns the snapshots into histogram
families (engine/server/metrics.py). The histograms stay this small class rather than
``prometheus_client.Histogram``: callers get immutable, consistent snapshots
(``HistogramSnapshot``, buckets + sum + count taken under one lock), ``observe`` takes a
weight (a step that emits k tokens records k inter-token gaps in one call), and each
engine keeps its own, outside any global registry.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import threading

from ferry.engine.outputs import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


@dataclasses.dataclass(frozen=True)
class HistogramSnapshot:
    """Immutable copy of a histogram: per-bucket counts (last one is +Inf), sum, count."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float
    count: int

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, cumulative count) pairs, ending with (inf, count)."""
        out, acc = [], 0
        for bound, c in zip(self.bounds + (math.inf,), self.counts):
            acc += c
            out.append((bound, acc))
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

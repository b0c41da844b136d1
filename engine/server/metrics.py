"""Prometheus text rendering of an engine stats snapshot and latency histograms (``GET /metrics``).

No prometheus_client dependency: the exposition format (text 0.0.4) is written by hand.
"""
from __future__ import annotations

import numbers
from typing import Mapping

from ferry.engine.entrypoints.latency import HistogramSnapshot, format_value as _fmt

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


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + body + "}"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

"""TTFT reference: prefill first, fewest prompt tokens left first (simulator reference only).

Every job with prompt left to prefill goes before every decoding job, the one with the fewest prompt
tokens left first (shortest remaining prefill: on one server with preemption at chunk boundaries it
minimises the mean time to finish prefill, i.e. the mean TTFT); decoding jobs follow by arrival. It may
evict anyone ranked below. It ignores everything but TTFT, so its JCT and swap traffic mean nothing.

What it is for: the sweep's TTFT target (5x below FCFS's) is only worth counting in cells where some
order reaches it; the no-queueing floor (every prefill alone) ignores that prefills queue on each
other in bursts and long-prompt mixes, so this order gives a tighter count. With batching and a page
budget it is a reference, not a bound.
"""
from __future__ import annotations

from ferry.scheduler.policy import Policy
from ferry.scheduler.request_state import Job


class PrefillFirst(Policy):
    name = "ttft"

    def order(self, jobs: list[Job]) -> list[Job]:
        return sorted(jobs, key=lambda j: (-j.priority, j.prompt_left == 0, j.prompt_left, j.arrival))

"""FCFS with iteration-level batching (Orca / vLLM): the baseline.

Jobs run to completion in arrival order; new jobs join the batch between
iterations when slots and pages allow. Under memory pressure the latest
arrivals lose their KV first (the Scheduler swaps or drops it), as in vLLM.
"""
from __future__ import annotations

from ferry.scheduler.policy import Policy
from ferry.scheduler.request_state import Job


class FCFS(Policy):
    name = "fcfs"

    def order(self, jobs: list[Job]) -> list[Job]:
        return sorted(jobs, key=lambda j: (-j.priority, j.arrival))

"""Scheduling policy interface: who goes first. The Scheduler does pages and batching.

A policy ranks live jobs each iteration (``order``), is told when jobs join
(``on_add``) and how much service each batch member received (``on_served``),
and may reshuffle priorities over time (``refresh``: starvation guard).
"""
from __future__ import annotations

from ferry.scheduler.request_state import Job


class Policy:
    name = "policy"

    def __init__(self) -> None:
        self.demotions = 0
        self.promotions = 0

    def on_add(self, job: Job, now: float) -> None:
        job.enqueued = now
        job.last_run = now

    def refresh(self, jobs: list[Job], now: float, free_page_share: float = 0.0) -> None:
        """Called at the start of every ``schedule``; ``free_page_share``: the fraction of device KV pages
        free (the Scheduler's pool; 0 when not given)."""

    def order(self, jobs: list[Job]) -> list[Job]:
        """Jobs from highest to lowest priority."""
        raise NotImplementedError

    def on_served(self, job: Job, seconds: float, now: float) -> None:
        """``job`` was in the batch of an iteration that took ``seconds``."""
        job.last_run = now

    def may_evict(self, victim: Job, for_job: Job) -> bool:
        """May ``victim`` (idle, ranked below ``for_job``) lose its device KV so ``for_job`` can run?"""
        return True

    def may_offload(self, job: Job) -> bool:
        """May idle ``job`` be offloaded ahead of need (proactive, under the free-page watermark)?"""
        return True

    def on_finish(self, job: Job) -> None:
        """``job`` generated its last token (not called for aborts)."""

    def queue_stats(self, waiting: list[Job]) -> dict[str, int]:
        return {"waiting": len(waiting)}

"""KV placement for one plan: on-demand eviction, swap-in, proactive offload/upload, recompute.

A ``KVPlanner`` is made per ``Scheduler.schedule`` call. It moves pages between the
device and host pools and records every move in the copy lists the Plan carries:

* ``evict(job, allow_drop)``: offload the job's device KV to host pages (swap-out);
  with no host room, drop it (recompute later) when allowed.
* ``upload(job)``: swap a job's KV back in (host -> fresh device pages).
* ``proactive(idle_lowest_first, order, margin)``: FastServe's proactive management;
  while free device pages are under ``margin`` the idle jobs predicted to run latest
  are offloaded ahead of need, then while there is room above it the swapped jobs
  predicted to run soonest are uploaded (the copies overlap the step: JAX dispatch is
  asynchronous).

Copy ordering: the engine runs all swap-outs, then all swap-ins, then the work. So a
device page freed by a swap-out may be reused by a swap-in or by work in the same
plan, but a host page read by a swap-in is freed only in ``finish``: no swap-out of
the same plan may overwrite it.
"""
from __future__ import annotations

from ferry.scheduler.block_manager import PagePool
from ferry.scheduler.request_state import Job, State


class KVPlanner:
    def __init__(self, device: PagePool, host: PagePool, counters: dict[str, int]) -> None:
        self.device, self.host, self.counters = device, host, counters
        self.swap_out: list[tuple[int, int]] = []     # (device_page, host_page)
        self.swap_in: list[tuple[int, int]] = []      # (host_page, device_page)
        self.dropped: list[str] = []
        self.evicted: set[str] = set()
        self.freed_device = 0                         # device pages released by evictions so far
        self._host_to_free: list[int] = []

    def evict(self, job: Job, allow_drop: bool) -> bool:
        """Take the job's KV off the device; False if it must stay (no host room, no drop)."""
        n = len(job.pages)
        if self.host.num_free >= n:
            host = self.host.allocate(n)
            self.swap_out.extend(zip(job.pages, host))
            self.counters["swap_out_pages"] += n
            job.host_pages, job.state = host, State.SWAPPED
        elif allow_drop:
            job.num_computed, job.state, job.released = 0, State.WAITING, 0
            self.dropped.append(job.rid)
            self.counters["recomputes"] += 1
        else:
            return False
        self.device.free(job.pages)
        self.freed_device += n
        job.pages = []
        self.evicted.add(job.rid)
        return True

    def upload(self, job: Job) -> None:
        """Swap a SWAPPED job's KV in; the caller checked there are enough free device pages."""
        dev = self.device.allocate(len(job.host_pages))
        self.swap_in.extend(zip(job.host_pages, dev))
        self.counters["swap_in_pages"] += len(dev)
        self._host_to_free += job.host_pages
        job.pages, job.host_pages, job.state = dev, [], State.PREEMPTED

    def proactive(self, idle_lowest_first: list[Job], order: list[Job], chosen, margin: int) -> None:
        """Offload the latest-to-run idle jobs under the watermark; upload the soonest above it."""
        for job in idle_lowest_first:
            if self.device.num_free >= margin or not self.evict(job, allow_drop=False):
                break
        for job in order:
            if job.state != State.SWAPPED or job.rid in self.evicted or job.rid in chosen:
                continue
            if self.device.num_free - len(job.host_pages) < margin:
                break
            self.upload(job)

    def finish(self) -> None:
        """Release the host pages read by this plan's swap-ins (after all its swap-outs were placed)."""
        self.host.free(self._host_to_free)
        self._host_to_free = []

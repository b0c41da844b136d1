"""Page pools: which pages are free. Ownership lives on the jobs (``Job.pages``).

Device pages are numbered 1..N-1 (page 0 is the engine's null page, never
handed out); host pages 0..M-1. ``check`` verifies the invariant the tests
rely on: every page is either free or owned by exactly one live job.

A free page may be *parked*: it still holds the KV of a job that was swapped out
(tagged with the job and the page's place in its KV). Parked pages are handed out
last, oldest first; until then the job's swap-in takes them back without a copy
(``kv_planner.py``).
"""
from __future__ import annotations

import collections


class PagePool:
    def __init__(self, num_pages: int, first: int = 0) -> None:
        self.total = max(0, num_pages - first)
        self._free = list(range(num_pages - 1, first - 1, -1))        # pop() hands out low pages first
        self._parked: collections.OrderedDict[int, tuple[str, int]] = collections.OrderedDict()
        # free pages still holding a swapped-out job's KV: page -> (request id, index in its pages)

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._parked)

    @property
    def num_used(self) -> int:
        return self.total - self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"page pool exhausted: want {n}, have {self.num_free}")
        out = [self._free.pop() for _ in range(min(n, len(self._free)))]
        while len(out) < n:                       # then the pages parked longest ago (their KV is lost)
            out.append(self._parked.popitem(last=False)[0])
        return out

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    def park(self, pages: list[int], rid: str) -> None:
        """Free ``pages`` (request ``rid``'s, in order) but keep them apart, handed out last."""
        for i, p in enumerate(pages):
            self._parked[p] = (rid, i)

    def unpark(self, page: int, rid: str, index: int) -> bool:
        """Take ``page`` back for ``rid`` if it is still parked as its ``index``-th page (intact)."""
        if self._parked.get(page) != (rid, index):
            return False
        del self._parked[page]
        return True

    def forget(self, pages: list[int], rid: str) -> None:
        """``rid`` will not take these back (it ended): the ones still parked become plain free pages."""
        for i, p in enumerate(pages):
            if self._parked.get(p) == (rid, i):
                del self._parked[p]
                self._free.append(p)

    def free_set(self) -> set[int]:
        return set(self._free) | set(self._parked)


def check_ownership(jobs, device: PagePool, host: PagePool, first_device_page: int = 1) -> None:
    """Raise AssertionError unless every page is free xor owned by exactly one live job."""
    seen_dev: dict[int, str] = {}
    seen_host: dict[int, str] = {}
    for j in jobs:
        for p in j.pages:
            assert p >= first_device_page, f"{j.rid} owns reserved device page {p}"
            assert p not in seen_dev, f"device page {p} owned by {seen_dev[p]} and {j.rid}"
            seen_dev[p] = j.rid
        for p in j.host_pages + j.host_copy:
            assert p not in seen_host, f"host page {p} owned by {seen_host[p]} and {j.rid}"
            seen_host[p] = j.rid
    assert not (set(seen_dev) & device.free_set()), "a device page is both owned and free"
    assert not (set(seen_host) & host.free_set()), "a host page is both owned and free"
    assert len(seen_dev) + device.num_free == device.total, "device pages leaked"
    assert len(seen_host) + host.num_free == host.total, "host pages leaked"

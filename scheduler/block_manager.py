"""Page pools: which pages are free. Ownership lives on the jobs (``Job.pages``).

Device pages are numbered 1..N-1 (page 0 is the engine's null page, never
handed out); host pages 0..M-1. ``check`` verifies the invariant the tests
rely on: every page is either free or owned by exactly one live job.
"""
from __future__ import annotations


class PagePool:
    def __init__(self, num_pages: int, first: int = 0) -> None:
        self.total = max(0, num_pages - first)
        self._free = list(range(num_pages - 1, first - 1, -1))        # pop() hands out low pages first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.total - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"page pool exhausted: want {n}, have {len(self._free)}")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    def free_set(self) -> set[int]:
        return set(self._free)


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

"""Paged KV cache: device pages, host swap pages, and the copies between them.

Device: ``k, v: f[L, Hkv, P, S, Dh]`` (page 0 is the null page). Host: numpy
``f[L, Hkv, P_host, S, Dh]``. Which request owns which page is the
scheduler's business (``scheduler/block_manager.py``); this module only moves
bytes. Copies are padded to the ``swap_pages`` buckets (padding moves the null
page, harmless) so they never compile while serving.

Swap-out does not block the step: the pages are gathered on device and their
device-to-host copy started (``copy_to_host_async``); the step is dispatched
behind the gather (device work is ordered, so the freed pages are overwritten
only after it), and the bytes land in the host pages at ``finish_swaps()``: the
engine calls it at the start of the next step, and any swap-in calls it first.
Swap-in still gathers its pages on the host and uploads them from pageable
memory before the step is dispatched (not overlapped; pinned host memory is not
used). Neither has been timed on a GPU.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ferry.engine.config import Buckets
from ferry.engine.sharding import put_global, to_host
from jax.sharding import NamedSharding, PartitionSpec as P
from ferry.models.config import ModelConfig


def page_bytes(cfg: ModelConfig, page_size: int, dtype) -> int:
    """Bytes of K + V for one page across all layers."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * np.dtype(dtype).itemsize


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _scatter_pages(k, v, pages, k_new, v_new):
    return k.at[:, :, pages].set(k_new), v.at[:, :, pages].set(v_new)


def _gather_pages(k, v, pages):
    return k[:, :, pages], v[:, :, pages]


class KVCache:
    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, num_host_pages: int,
                 dtype, buckets: Buckets, guard, sharding=None) -> None:
        if num_pages < 2:
            raise ValueError(f"KV cache needs at least 2 pages (one is the null page), got {num_pages}")
        self.cfg, self.num_pages, self.page_size = cfg, num_pages, page_size
        self.num_host_pages, self.dtype, self.buckets = num_host_pages, np.dtype(dtype), buckets
        self.guard = guard
        self.sharding = sharding            # NamedSharding over KV heads under tensor parallel, else None
        # Swap-out gathers to a replicated array so every process can read all KV heads.
        rep = NamedSharding(sharding.mesh, P()) if sharding is not None else None
        self._gather = jax.jit(_gather_pages, out_shardings=(rep, rep) if rep is not None else None)
        self.rebuild_device()
        # One extra host page (index num_host_pages) is the scratch sink/source of bucket padding,
        # so padded copies never touch a real host page or a real device page (only the null page).
        self.scratch = num_host_pages
        hshape = (cfg.num_layers, cfg.num_kv_heads, num_host_pages + 1, page_size, cfg.head_dim)
        self.host_k = np.zeros(hshape, self.dtype)
        self.host_v = np.zeros(hshape, self.dtype)
        self._pending: list[tuple[int, np.ndarray, jax.Array, jax.Array]] = []   # swap-outs in flight

    def rebuild_device(self) -> None:
        """(Re)allocate the device pages as zeros: at start-up, and after a failed program consumed
        the donated buffers (their contents are lost; the requests that owned them were ended)."""
        shape = (self.cfg.num_layers, self.cfg.num_kv_heads, self.num_pages, self.page_size, self.cfg.head_dim)
        self._pending = []                  # copies of the lost buffers: their requests were ended
        make = functools.partial(jnp.zeros, shape, self.dtype)
        self.k = jax.jit(make, out_shardings=self.sharding)() if self.sharding is not None else make()
        self.v = jax.jit(make, out_shardings=self.sharding)() if self.sharding is not None else make()

    # ---------------------------------------------------------------- swaps
    def _chunks(self, pairs, pad_src: int, pad_dst: int):
        big = self.buckets.swap_pages[-1]
        for i in range(0, len(pairs), big):
            part = pairs[i:i + big]
            n = Buckets.pick(self.buckets.swap_pages, len(part))
            src = np.full(n, pad_src, np.int32)
            dst = np.full(n, pad_dst, np.int32)
            src[:len(part)] = [a for a, _ in part]
            dst[:len(part)] = [b for _, b in part]
            yield len(part), src, dst

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (device_page -> host_page) for each pair."""
        with self.guard.watch("swap_out"):
            self._swap_out(pairs)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (host_page -> device_page) for each pair; padding entries write the null page."""
        with self.guard.watch("swap_in"):
            self._swap_in(pairs)

    def _swap_out(self, pairs):
        for n, dev, host in self._chunks(pairs, 0, self.scratch):
            k, v = self._gather(self.k, self.v, self._idx(dev))        # device: f[L, Hkv, n, S, Dh]
            for a in (k, v):
                try:
                    a.copy_to_host_async()
                except (AttributeError, RuntimeError):
                    pass
            self._pending.append((n, host, k, v))

    def finish_swaps(self) -> None:
        """Write the swap-outs in flight into their host pages (waits for their copies)."""
        pending, self._pending = self._pending, []
        for n, host, k, v in pending:
            k, v = to_host((k, v))
            self.host_k[:, :, host[:n]] = k[:, :, :n]
            self.host_v[:, :, host[:n]] = v[:, :, :n]

    def _swap_in(self, pairs):
        self.finish_swaps()                        # a page swapped out just now may be read back
        for n, host, dev in self._chunks(pairs, self.scratch, 0):
            hk = self.host_k[:, :, host]
            hv = self.host_v[:, :, host]
            self.k, self.v = _scatter_pages(self.k, self.v, self._idx(dev), self._put(hk), self._put(hv))

    def _idx(self, pages: np.ndarray):
        if self.sharding is not None and jax.process_count() > 1:
            return put_global(pages, NamedSharding(self.sharding.mesh, P()))
        return jnp.asarray(pages)

    def _put(self, pages_kv: np.ndarray):
        """Host pages f[L, Hkv, n, S, Dh] -> device, already split by KV head under TP."""
        if self.sharding is not None:
            return put_global(pages_kv, self.sharding)
        return jnp.asarray(pages_kv)

    def warmup(self) -> None:
        """Compile every swap bucket (copies the null page out and back onto itself)."""
        for n in self.buckets.swap_pages:
            self._swap_out([(0, self.scratch)] * n)
            self._swap_in([(self.scratch, 0)] * n)
        self.finish_swaps()
        jax.block_until_ready(self.k)


def pages_for_budget(cfg: ModelConfig, page_size: int, dtype, budget_bytes: float) -> int:
    return max(2, int(math.floor(budget_bytes / page_bytes(cfg, page_size, dtype))))

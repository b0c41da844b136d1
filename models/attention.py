"""The attention call of every decoder layer: write this step's K/V into pages, then ragged
paged attention (kernels/ragged_attention.py) over the rows of the step.

``AttnMeta`` is all a layer needs to know about the step's rows:
  slot_mapping: i32[N]   page * S + offset of each token's K/V; -1 = do not write
  layout:       RaggedLayout (which tokens form which row; one-token rows and query blocks)
The decode program's meta is ``AttnMeta(slot_mapping, RaggedLayout.decode(tables, seq_lens))``.

With a tensor-parallel ``mesh`` the whole call runs per shard under ``shard_map``:
each device writes and reads only its own KV heads' pages, so kernels never see a
sharded axis.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
from jax.sharding import PartitionSpec as P

from ferry.kernels.prefill_attention import write_kv
from ferry.kernels.ragged_attention import RaggedLayout, ragged_paged_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttnMeta:
    slot_mapping: jax.Array      # i32[N]
    layout: RaggedLayout


def op_impl(impl, op: str) -> str:
    """``impl``: one string for every op ("auto" | "reference" | "pallas"), or the engine's
    ``KernelChoice`` (kernels/selection.py), resolved once per engine, per op."""
    return impl if isinstance(impl, str) else impl.impl(op)


def _attend_local(q, k, v, k_cache, v_cache, meta: AttnMeta, positions, *, layer, scale, impl, soft_cap, window):
    k_cache, v_cache = write_kv(k_cache, v_cache, layer, k, v, meta.slot_mapping, impl=op_impl(impl, "kv_write"))
    o = ragged_paged_attention(q, k_cache, v_cache, layer, positions, meta.layout, scale=scale, soft_cap=soft_cap,
                               window=window, impl=op_impl(impl, "prefill_attention"),
                               single_impl=op_impl(impl, "paged_attention"))
    return o, k_cache, v_cache


def attend(q, k, v, k_cache, v_cache, layer: int, meta: AttnMeta, positions, *, scale: float, impl,
           mesh=None, soft_cap: float | None = None, window: int | None = None):
    """q: f[N, Hq, Dh]; k, v: f[N, Hkv, Dh]; positions: i32[N] (-1 = padding);
    caches f[L, Hkv, P, S, Dh]. Returns (o f[N, Hq, Dh], k_cache, v_cache).
    ``soft_cap``/``window``: attention-logit soft-cap and sliding window of this layer (None = off)."""
    fn = functools.partial(_attend_local, layer=layer, scale=scale, impl=impl, soft_cap=soft_cap, window=window)
    if mesh is None or mesh.size == 1:
        return fn(q, k, v, k_cache, v_cache, meta, positions)
    heads, cache, rep = P(None, "tp", None), P(None, "tp", None, None, None), P()
    meta_spec = jax.tree.map(lambda _: rep, meta)
    return jax.shard_map(fn, mesh=mesh, in_specs=(heads, heads, heads, cache, cache, meta_spec, rep),
                         out_specs=(heads, cache, cache), check_vma=False)(
        q, k, v, k_cache, v_cache, meta, positions)


def one_request_meta(positions, pages, page_size: int) -> AttnMeta:
    """Host-side meta for the tokens of one request (numpy ``positions: i32[T]``, -1 = padding;
    ``pages: i32[P]`` its block table): one query block of T tokens, or one-token rows when T == 1.
    For tests and single-request tools; the engine builds layouts in engine/step_inputs.py."""
    import numpy as np
    positions = np.asarray(positions, np.int32)
    pages = np.asarray(pages, np.int32)
    T = positions.shape[0]
    real = positions >= 0
    slots = np.where(real, pages[np.maximum(positions, 0) // page_size] * page_size
                     + np.maximum(positions, 0) % page_size, -1).astype(np.int32)
    empty = np.zeros((0,), np.int32)
    if T == 1:
        lay = RaggedLayout(np.zeros(1, np.int32), pages[None], (positions + 1).clip(0), empty, empty,
                           np.zeros((0, pages.shape[0]), np.int32), q_block=1)
    else:
        lay = RaggedLayout(np.full(1, -1, np.int32), np.zeros((1, pages.shape[0]), np.int32), np.zeros(1, np.int32),
                           np.zeros(1, np.int32), np.array([int(real.sum())], np.int32), pages[None], q_block=T)
    return AttnMeta(slots, lay)

"""Prefill attention over pages, and the write of new K/V into pages.

``write_kv(k_cache, v_cache, layer, k, v, slot_mapping)``: k, v: f[T, Hkv, Dh];
slot_mapping: i32[T] with slot = page * S + offset; slot < 0 (or >= P * S)
marks a padding token whose K/V is not written; values are cast to the cache
dtype. Returns the updated caches (donated in the engine step, so they are
updated in place). ``impl``: "reference" (XLA scatter), "pallas"
(``kernels.kv_write_pallas.write_kv``: Triton on GPU, interpret mode on CPU),
"auto" (Pallas on GPU, the reference elsewhere: the kernel has no TPU variant).

``prefill_attention(q, k_cache, v_cache, layer, block_table, positions)``: one
request's chunk. q: f[T, Hq, Dh]; block_table: i32[P_max]; positions: i32[T]
(absolute position of each query token; -1 = padding, output 0). Token t
attends causally to the request's cached tokens 0..positions[t], which include
the chunk itself (written by ``write_kv`` first) and all earlier chunks.
``soft_cap`` and ``window`` as in ``kernels.paged_attention``: with a window, token t
sees keys at positions > positions[t] - window.

Pallas kernel (GPU Triton lowering; interpret mode in tests):
``kernels.prefill_attention_pallas.prefill_attention`` (same contract, tested
against the reference and through the engine's prefill step; see docs/KERNELS.md).
"""
from __future__ import annotations

import jax.numpy as jnp

from ferry.kernels.common import interpret, resolve_impl


def write_kv_reference(k_cache, v_cache, layer, k, v, slot_mapping):
    _, _, P, S, _ = k_cache.shape
    slot = jnp.where(slot_mapping < 0, P * S, slot_mapping)   # out of range -> dropped
    page, off = slot // S, slot % S
    k_cache = k_cache.at[layer, :, page, off].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[layer, :, page, off].set(v.astype(v_cache.dtype), mode="drop")
    return k_cache, v_cache


def write_kv(k_cache, v_cache, layer, k, v, slot_mapping, *, impl: str = "auto"):
    """Dispatch to the reference scatter or the Pallas kernel (see module docstring)."""
    if resolve_impl(impl, "KV write") == "reference":
        return write_kv_reference(k_cache, v_cache, layer, k, v, slot_mapping)
    from ferry.kernels import kv_write_pallas
    return kv_write_pallas.write_kv(k_cache, v_cache, layer, k, v, slot_mapping,   # CPU: interpret mode
                                    interpret=interpret())


def prefill_attention_reference(q, k_cache, v_cache, layer, block_table, positions, *,
                                scale: float, soft_cap: float | None = None, window: int | None = None):
    T, Hq, Dh = q.shape
    _, Hkv, _, S, _ = k_cache.shape
    G = Hq // Hkv
    C = block_table.shape[0] * S
    # One gather straight from the whole cache: [P_max, Hkv, S, Dh] -> [Hkv, C, Dh]
    k = k_cache[layer, :, block_table].transpose(1, 0, 2, 3).reshape(Hkv, C, Dh).astype(jnp.float32)
    v = v_cache[layer, :, block_table].transpose(1, 0, 2, 3).reshape(Hkv, C, Dh).astype(jnp.float32)
    qg = q.reshape(T, Hkv, G, Dh).astype(jnp.float32)
    s = jnp.einsum("thgd,hcd->hgtc", qg, k) * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    key = jnp.arange(C)[None, :]
    mask = key <= positions[:, None]                                     # [T, C]
    if window is not None:                                               # keys > position - window
        mask &= key > positions[:, None] - window
    s = jnp.where(mask[None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    # Slots past the longest query position (or before the earliest window) may hold stale data or
    # freed pages: keep them out (0 * NaN).
    seen = jnp.arange(C) <= jnp.max(positions)
    if window is not None:
        first = jnp.min(jnp.where(positions >= 0, positions, jnp.iinfo(jnp.int32).max))
        seen &= jnp.arange(C) > first - window
    v = jnp.where(seen[None, :, None], v, 0.0)
    o = jnp.einsum("hgtc,hcd->thgd", p / jnp.maximum(l, 1e-30), v)
    return o.reshape(T, Hq, Dh).astype(q.dtype)


def prefill_attention(q, k_cache, v_cache, layer, block_table, positions, *, scale: float,
                      soft_cap: float | None = None, window: int | None = None, impl: str = "auto"):
    """Dispatch to the reference or the Pallas kernel (see module docstring)."""
    if resolve_impl(impl, "prefill attention") == "reference":       # Triton-only: TPU takes the reference
        return prefill_attention_reference(q, k_cache, v_cache, layer, block_table, positions,
                                           scale=scale, soft_cap=soft_cap, window=window)
    from ferry.kernels import prefill_attention_pallas
    extra = {} if window is None else {"window": window}
    return prefill_attention_pallas.prefill_attention(      # CPU: interpret mode (tests)
        q, k_cache, v_cache, layer, block_table, positions, scale=scale, soft_cap=soft_cap,
        interpret=interpret(), **extra)

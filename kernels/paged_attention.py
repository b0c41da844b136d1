"""Decode paged attention: one query token per row over a paged KV cache.

Cache layout (engine-wide): ``k_cache, v_cache: f[L, Hkv, P, S, Dh]`` (layers,
KV heads, pages, page size, head dim). Page 0 is the null page that pads block
tables. Kernels take the whole cache plus a layer index so that no per-layer
slice is ever copied.

``paged_attention(q, k_cache, v_cache, layer, block_tables, seq_lens)``:
  q: f[B, Hq, Dh]; block_tables: i32[B, P_max]; seq_lens: i32[B] (number of
  cached tokens the row attends to, the current token included; 0 = padding
  row, whose output is 0). Returns f[B, Hq, Dh] in q's dtype. ``soft_cap``: scores ->
  cap * tanh(scores / cap); ``window``: sliding window, the row (at position seq_len - 1)
  sees keys at positions > seq_len - 1 - window.

Backends: ``impl="reference"`` (pure JAX gather + dense softmax, used on CPU),
``impl="pallas"`` (GPU/TPU kernel: Triton lowering on GPU, the Mosaic TPU variant in
``kernels/_tpu_paged_attention.py`` on TPU), ``impl="auto"`` picks by platform.
"""
from __future__ import annotations

import jax.numpy as jnp

from ferry.kernels.common import interpret, resolve_impl


def paged_attention_reference(q, k_cache, v_cache, layer, block_tables, seq_lens, *,
                              scale: float, soft_cap: float | None = None, window: int | None = None):
    B, Hq, Dh = q.shape
    _, Hkv, _, S, _ = k_cache.shape
    G = Hq // Hkv
    P_max = block_tables.shape[1]
    # One gather straight from the whole cache (no per-layer slice copy): [B, P_max, Hkv, S, Dh]
    k = k_cache[layer, :, block_tables]
    v = v_cache[layer, :, block_tables]
    qg = q.reshape(B, Hkv, G, Dh).astype(jnp.float32)
    s = jnp.einsum("bhgd,bphsd->bhgps", qg, k, preferred_element_type=jnp.float32) * scale
    s = s.reshape(B, Hkv, G, P_max * S)
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    key = jnp.arange(P_max * S)[None, :]
    mask = key < seq_lens[:, None]                                     # [B, C]
    if window is not None:                                             # keys > position - window
        mask &= key >= seq_lens[:, None] - window
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = (p / jnp.maximum(l, 1e-30)).reshape(B, Hkv, G, P_max, S)
    # Masked slots may hold stale data from a page's previous owner: never let it in (0 * NaN).
    vmask = mask.reshape(B, P_max, 1, S, 1)
    v = jnp.where(vmask, v.astype(jnp.float32), 0.0)
    o = jnp.einsum("bhgps,bphsd->bhgd", p, v)
    return o.reshape(B, Hq, Dh).astype(q.dtype)


def paged_attention(q, k_cache, v_cache, layer, block_tables, seq_lens, *, scale: float,
                    soft_cap: float | None = None, window: int | None = None, impl: str = "auto"):
    """Dispatch to the reference or the Pallas kernel (see module docstring)."""
    impl = resolve_impl(impl, "paged attention", backends=("gpu", "tpu"))
    if impl == "reference":
        return paged_attention_reference(q, k_cache, v_cache, layer, block_tables, seq_lens,
                                         scale=scale, soft_cap=soft_cap, window=window)
    from ferry.kernels import paged_attention_pallas
    extra = {} if window is None else {"window": window}
    return paged_attention_pallas.paged_attention(      # CPU: interpret mode (tests)
        q, k_cache, v_cache, layer, block_tables, seq_lens, scale=scale, soft_cap=soft_cap,
        interpret=interpret(), **extra)

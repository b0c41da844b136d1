"""Decode paged attention in Pallas (GPU lowering through Triton; CPU tests in interpret mode).

Grid ``(B, Hkv, num_splits)``: one program per (row, KV head, split of the
row's pages). A program holds all ``G = Hq / Hkv`` query heads of its KV head
(``q: [G, Dh]`` in registers, no padding of small groups in memory), walks
its pages through the block table (a scalar read per page), and keeps an
online softmax in f32: running max ``m[G]``, sum ``l[G]``, accumulator
``acc[G, Dh]``. Scores are formed by broadcast-multiply-reduce rather than
``dot``: decode attention reads each K/V byte once (memory bound), and this
avoids Triton's 16-row minimum for ``dot`` when G is 1..8.

Split-K (flash-decoding): with few rows (``B * Hkv`` small) and long contexts
one program per row leaves most SMs idle, so each row's pages are cut into
``num_splits`` contiguous ranges whose partial ``(m, l, acc)`` are merged by a
log-sum-exp combine in XLA. ``num_splits`` defaults from the grid size.

Masking: positions ``>= seq_len`` get score ``-inf`` and their V is replaced by
zeros with ``where`` (stale data in recycled pages may be NaN). A row with
``seq_len == 0`` (padding) outputs zeros.

Backend notes: Triton was chosen over Mosaic GPU for this kernel because the
access pattern is a data-dependent gather of small pages (one block-table
lookup per page) that Triton expresses as pointer arithmetic; Mosaic GPU's
TMA/WGMMA pipeline pays off for large dense tiles. This session had no GPU,
so neither lowering was measured here (see docs/KERNELS.md and
scripts/bench_kernels.py for the measurement plan). TPU would use the Mosaic
TPU lowering with block tables in scalar prefetch; it is not implemented.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _kernel(lens_ref, bt_ref, layer_ref, q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, *,
            scale: float, soft_cap: float | None, page_size: int, pages_per_split: int):
    b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    seq_len = lens_ref[b]
    layer = layer_ref[0]
    q = q_ref[0, 0].astype(jnp.float32) * scale                 # [G, Dh]
    G, Dh = q.shape
    first = sp * pages_per_split
    n_pages = jnp.clip(pl.cdiv(seq_len, page_size) - first, 0, pages_per_split)

    def body(i, carry):
        m, l, acc = carry
        page = bt_ref[b, first + i]
        k = k_ref[layer, h, page].astype(jnp.float32)            # [S, Dh]
        v = v_ref[layer, h, page].astype(jnp.float32)
        pos = (first + i) * page_size + jnp.arange(page_size)
        valid = pos < seq_len                                    # [S]
        s = jnp.sum(q[:, None, :] * k[None, :, :], axis=-1)      # [G, S]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))              # [G]
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])                         # [G, S]
        alpha = jnp.exp(jnp.where(m == -jnp.inf, -jnp.inf, m - m_safe))
        v = jnp.where(valid[:, None], v, 0.0)
        acc = acc * alpha[:, None] + jnp.sum(p[:, :, None] * v[None, :, :], axis=1)
        return m_new, l * alpha + jnp.sum(p, axis=-1), acc

    init = (jnp.full((G,), -jnp.inf, jnp.float32), jnp.zeros((G,), jnp.float32), jnp.zeros((G, Dh), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_pages, body, init)
    m_ref[0, 0, 0] = m
    l_ref[0, 0, 0] = l
    acc_ref[0, 0, 0] = acc


def default_splits(batch: int, kv_heads: int, max_pages: int, target_programs: int = 264) -> int:
    """Enough splits that B * Hkv * splits covers ~2 waves of an H100 (132 SMs), >= 8 pages each."""
    want = max(1, target_programs // max(1, batch * kv_heads))
    return int(max(1, min(want, max_pages // 8)))


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "num_splits", "interpret"))
def paged_attention(q, k_cache, v_cache, layer, block_tables, seq_lens, *, scale: float,
                    soft_cap: float | None = None, num_splits: int | None = None, interpret: bool = False):
    """Same contract as ``kernels.paged_attention.paged_attention_reference``.

    q: f[B, Hq, Dh]; k_cache, v_cache: f[L, Hkv, P, S, Dh]; layer: int or i32[];
    block_tables: i32[B, P_max]; seq_lens: i32[B]. Returns f[B, Hq, Dh].
    """
    B, Hq, Dh = q.shape
    _, Hkv, _, S, _ = k_cache.shape
    G = Hq // Hkv
    P_max = block_tables.shape[1]
    n = num_splits or default_splits(B, Hkv, P_max)
    per = -(-P_max // n)
    tables = jnp.pad(block_tables, ((0, 0), (0, per * n - P_max)))       # null page pads the last split
    qg = q.reshape(B, Hkv, G, Dh)
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
    kernel = functools.partial(_kernel, scale=scale, soft_cap=soft_cap, page_size=S, pages_per_split=per)
    # Caches stay in HBM (pages are gathered by pointer arithmetic); small tables are whole blocks.
    whole = pl.BlockSpec(memory_space=pl.ANY) if not interpret else pl.no_block_spec
    small = pl.no_block_spec
    in_specs = [small, small, small, pl.BlockSpec((1, 1, G, Dh), lambda b, h, s: (b, h, 0, 0)), whole, whole]
    out_specs = [pl.BlockSpec((1, 1, 1, G), lambda b, h, s: (b, h, s, 0)),
                 pl.BlockSpec((1, 1, 1, G), lambda b, h, s: (b, h, s, 0)),
                 pl.BlockSpec((1, 1, 1, G, Dh), lambda b, h, s: (b, h, s, 0, 0))]
    m, l, acc = pl.pallas_call(
        kernel, grid=(B, Hkv, n), in_specs=in_specs, out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, n, G), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, n, G), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, n, G, Dh), jnp.float32)],
        interpret=interpret, name="ferry_paged_attention",
    )(seq_lens.astype(jnp.int32), tables.astype(jnp.int32), layer_arr, qg, k_cache, v_cache)
    # Combine the splits (log-sum-exp); splits that saw no token have m = -inf and weight 0.
    m_all = jnp.max(m, axis=2, keepdims=True)
    m_all = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    w = jnp.where(jnp.isfinite(m), jnp.exp(m - m_all), 0.0)             # [B, Hkv, n, G]
    l_tot = jnp.sum(w * l, axis=2)                                       # [B, Hkv, G]
    o = jnp.sum(w[..., None] * acc, axis=2) / jnp.maximum(l_tot, 1e-30)[..., None]
    return o.reshape(B, Hq, Dh).astype(q.dtype)

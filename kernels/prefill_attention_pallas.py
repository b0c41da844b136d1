"""Prefill (chunked) attention over pages in Pallas: Triton lowering on GPU, interpret mode on CPU.

Contract: ``kernels.prefill_attention.prefill_attention_reference``: one
request's chunk ``q: f[T, Hq, Dh]`` attends causally to the request's cached
tokens ``0..positions[t]`` (the chunk itself, written into the pages by
``write_kv`` first, plus every earlier chunk), reached through
``block_table: i32[P_max]``; ``positions[t] == -1`` marks a padding token
(output 0).

Layout: the G query heads of a KV head and the T tokens are flattened into
``R = T * G`` query rows per KV head (``q_rows: [Hkv, R, Dh]``, row
``t * G + g``), so one program's ``block_rows`` rows share every K/V tile it
loads (GQA without re-reading K/V per query head) and the score tile is a
plain 2-D MMA ``[block_rows, T_kv]``. Grid ``(Hkv, R / block_rows)``. Each
program walks the table ``pages_per_block`` pages at a time, only up to the
largest position among its rows (the causal bound: later pages are never
read), with an online softmax in f32. K/V rows are gathered through the
block table (``[T_kv, Dh]``, contiguous ``Dh`` vectors). Masking uses
``where`` on scores and on V, so stale data (NaN) in unwritten slots never
leaks. Sliding window (``window``): a program's walk starts at the first page
that any of its rows sees (the page of ``min(position) - window + 1``), so pages
wholly before every row's window are never read; per-row masks do the rest.
A head dim that is not a power of two (Triton tiles must be) runs on
``Dp = pow2(Dh)`` lanes: the q rows are zero-padded (with the row padding),
K/V lanes ``d >= Dh`` are clamped loads whose products with q's zero lanes
vanish, and the output's padded lanes are sliced off. Not compiled or timed on
a GPU in the session that wrote it; ``tests/kernels/test_lowering.py`` lowers
it for CUDA on a CPU host and checks the Triton IR.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ferry.kernels.common import pow2


def _kernel(bt_ref, layer_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, *, scale: float,
            soft_cap: float | None, page_size: int, pages_per_block: int, head_dim: int,
            window: int | None = None):
    h = pl.program_id(0)
    layer = layer_ref[0]
    q = q_ref[...]                                                    # [BR, Dp] (lanes >= Dh: zeros)
    pos = pos_ref[...]                                                # [BR] (-1 = padding)
    BR, Dp = q.shape
    if Dp == head_dim:
        lanes = (slice(None),)                                        # K/V rows: Dh contiguous elements
    else:                                                             # lanes d >= Dh: clamped (valid) loads,
        lanes = (jnp.minimum(jnp.arange(Dp), head_dim - 1)[None, :],)    # cancelled by q's zero lanes
    tf32 = q.dtype != jnp.float32
    TK = pages_per_block * page_size
    max_pos = jnp.max(pos)
    if window is None:
        start = 0
        n_iter = (max_pos + TK) // TK                                 # ceil((max_pos + 1) / TK); 0 if all pad
    else:
        # Sliding window: row r sees keys > pos[r] - window. The walk starts at the first page that
        # any row of the block sees (``start``, page-aligned; dynamic loop bounds): pages wholly
        # before every row's window are never read.
        lo = jnp.maximum(jnp.min(jnp.where(pos >= 0, pos, max_pos)) - window + 1, 0)
        start = lo // page_size * page_size
        n_iter = jnp.maximum(max_pos + 1 - start + TK - 1, 0) // TK    # 0 if all padding (max_pos = -1)
    tok = jnp.arange(TK, dtype=jnp.int32)

    def body(j, carry):
        m, l, acc = carry
        t = j * TK + tok if window is None else start + j * TK + tok  # [TK]
        page = bt_ref[t // page_size]
        off = t % page_size
        if Dp != head_dim:
            page, off = page[:, None], off[:, None]
        k = k_ref[(layer, h, page, off) + lanes]                      # [TK, Dp]
        v = v_ref[(layer, h, page, off) + lanes]
        s = plgpu.dot(q, k.astype(q.dtype), trans_b=True, allow_tf32=tf32).astype(jnp.float32) * scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        visible = t[None, :] <= pos[:, None]                          # [BR, TK] causal + padding
        keep = t <= max_pos                                           # V: never read past the chunk
        if window is not None:
            # Positions < start are never visited (loop bounds), so they are deliberately left
            # unmasked: a bound that let one in would show (the tests poison those pages with NaN).
            before = t < start
            visible &= (t[None, :] > pos[:, None] - window) | before[None, :]
            keep &= (t >= lo) | before                                # first page's head: no row sees it
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)             # padding rows: all -inf
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        v = jnp.where(keep[:, None], v, jnp.zeros_like(v))            # stale NaN must not meet 0 * NaN
        pv = plgpu.dot(p.astype(v.dtype), v, allow_tf32=tf32).astype(jnp.float32)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

    init = (jnp.full((BR,), -jnp.inf, jnp.float32), jnp.zeros((BR,), jnp.float32),
            jnp.zeros((BR, Dp), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n_iter, body, init)
    o_ref[...] = (acc / jnp.maximum(l, 1e-30)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "window", "block_rows", "pages_per_block",
                                             "num_warps", "num_stages", "interpret"))
def prefill_attention(q, k_cache, v_cache, layer, block_table, positions, *, scale: float,
                      soft_cap: float | None = None, window: int | None = None, block_rows: int | None = None,
                      pages_per_block: int | None = None, num_warps: int = 4, num_stages: int = 2,
                      interpret: bool = False):
    """Same contract as ``kernels.prefill_attention.prefill_attention_reference``.

    q: f[T, Hq, Dh]; k_cache, v_cache: f[L, Hkv, P, S, Dh]; layer: int or i32[];
    block_table: i32[P_max]; positions: i32[T]. Returns f[T, Hq, Dh] in q's dtype.
    Knobs: ``block_rows`` (query rows per program, power of two >= 16, default 64),
    ``pages_per_block`` (pages per loop iteration, default ~64 tokens), Triton
    ``num_warps``/``num_stages``. ``window`` (static): sliding window, token t sees keys at
    positions ``> positions[t] - window``; each program's page walk starts at the first page any of
    its rows sees, so pages wholly before every row's window are never read.
    """
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if q.ndim != 3 or k_cache.ndim != 5 or k_cache.shape != v_cache.shape or block_table.ndim != 1:
        raise ValueError(f"expected q[T, Hq, Dh], caches [L, Hkv, P, S, Dh], block_table[P_max]; got "
                         f"{q.shape}, {k_cache.shape}, {v_cache.shape}, {block_table.shape}")
    T, Hq, Dh = q.shape
    _, Hkv, _, S, _ = k_cache.shape
    if Hq % Hkv or positions.shape != (T,) or S & (S - 1):
        raise ValueError(f"bad shapes: Hq={Hq}, Hkv={Hkv}, positions {positions.shape}, page size {S}")
    G = Hq // Hkv
    R = T * G
    BR = block_rows or min(64, max(16, pow2(R)))
    if BR < 1 or BR & (BR - 1):
        raise ValueError(f"block_rows={BR} must be a power of two")
    P_max = block_table.shape[0]
    ppb = pages_per_block or int(min(max(1, 64 // S), pow2(P_max)))
    n_rb = -(-R // BR)
    Dp = pow2(Dh)                                                    # Triton tiles: powers of two
    rows = q.reshape(T, Hkv, G, Dh).transpose(1, 0, 2, 3).reshape(Hkv, R, Dh)
    rows = jnp.pad(rows, ((0, 0), (0, n_rb * BR - R), (0, Dp - Dh)))  # zero lanes: exact scores
    pos = jnp.pad(jnp.repeat(positions.astype(jnp.int32), G), (0, n_rb * BR - R), constant_values=-1)
    width = (-(-P_max // ppb) + (window is not None)) * ppb           # window: page-aligned start, <= ppb - 1 over
    table = jnp.pad(block_table.astype(jnp.int32), (0, width - P_max))   # null page
    extra = {}
    if not interpret:
        extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale, soft_cap=soft_cap, page_size=S, pages_per_block=ppb,
                          head_dim=Dh, window=window),
        grid=(Hkv, n_rb),
        in_specs=[pl.no_block_spec, pl.no_block_spec, pl.BlockSpec((BR,), lambda h, r: (r,)),
                  pl.BlockSpec((None, BR, Dp), lambda h, r: (h, r, 0)), pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.BlockSpec((None, BR, Dp), lambda h, r: (h, r, 0)),
        out_shape=jax.ShapeDtypeStruct((Hkv, n_rb * BR, Dp), q.dtype),
        interpret=interpret, name="ferry_prefill_attention", **extra,
    )(table, jnp.asarray(layer, jnp.int32).reshape(1), pos, rows, k_cache, v_cache)
    return out[:, :R, :Dh].reshape(Hkv, T, G, Dh).transpose(1, 0, 2, 3).reshape(T, Hq, Dh)

"""Decode paged attention in Pallas: Triton lowering on GPU, Mosaic TPU variant, interpret mode on CPU.

Contract: ``kernels.paged_attention.paged_attention_reference`` (cache
``f[L, Hkv, P, S, Dh]`` + layer index, page 0 the null page, ``seq_lens == 0``
rows output 0, masked slots removed with ``where`` so stale NaNs never leak).

GPU design (Triton). Grid ``(B, Hkv, num_splits)``: one program per (row, KV
head, contiguous range of the row's pages). A program
  * gathers the ``G = Hq / Hkv`` query heads of its KV head straight from
    ``q: [B, Hq, Dh]`` into a register tile of ``Gp = max(16, pow2(G))`` rows;
    the row index is clamped to ``G - 1`` so padded rows duplicate a real row
    (no padding of q, K or V in memory; the MMA's 16-row minimum is met in
    registers only, and the duplicates are stored to the same address with the
    same value, so no masked store is needed);
  * walks its pages ``pages_per_block`` at a time (``T = pages_per_block * S``
    tokens per iteration, default ~64): the block-table entries of the T
    tokens are read as a small vector, and K/V are loaded as one ``[T, Dh]``
    gather whose rows are contiguous ``Dh`` vectors (16-byte loads);
  * scores ``[Gp, T] = q @ K^T`` and ``acc += p @ V`` on the tensor cores with
    an online softmax in f32 (running max ``m``, sum ``l``);
  * writes its partial ``(m, l, acc)``; an XLA log-sum-exp combine merges the
    splits (flash-decoding) and normalises.
A head dim that is not a power of two (Triton tiles must be; e.g. 80, 96) runs
on ``Dp = pow2(Dh)`` lanes: q is zero-padded outside the kernel (a few KiB),
K/V lanes ``d >= Dh`` load a clamped, valid element of the same row (their
products with q's zero lanes vanish, so scores are exact), and the padded
lanes of ``acc`` are sliced off before the combine. Power-of-two head dims
take the unchanged contiguous-row loads.
``num_splits`` defaults from ``(B, Hkv, pages)`` so that small batches with
long contexts still put ~2 programs on each of the H100's 132 SMs.
Sliding window (``window``): the row sees keys ``>= seq_len - window``. Its walk
starts at the page holding the first of them (dynamic bound from ``seq_len``), and
the splits cut that live range evenly per row (``num_splits`` defaults from the
pages a window spans), so pages wholly before the window are never loaded; the
mask only trims the head of the first page.

Triton vs Mosaic GPU: this kernel is a data-dependent gather of small pages
(16 tokens x 256 bytes per head), which Triton expresses as pointer arithmetic
with many loads in flight (``num_stages``). Mosaic GPU's strength is
TMA + WGMMA on large dense tiles; TMA copies of 4 KiB pages through a
per-page descriptor gain little here, and WGMMA needs 64-row tiles (4x more
padding of G). Measured on an H200 (benchmarks/results/gpu/kernels_attention_nvidia_h200.json,
``scripts/bench_kernels.py``): this kernel read KV at 97% of copy bandwidth at B=64 L=2048 and was
faster than the Mosaic GPU variant (``paged_attention_mosaic_gpu.py``) in every case (0.62-0.91x
for that variant). ``tests/kernels/test_lowering.py`` lowers it for CUDA on a CPU host (Pallas ->
Triton IR, checked: tiles, dots, grid, knobs).

TPU: ``kernels/_tpu_paged_attention.py`` (block tables via scalar prefetch);
``backend="tpu"`` selects it (the default on a TPU backend).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ferry.kernels.common import pow2


def _kernel(lens_ref, bt_ref, layer_ref, q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, *,
            scale: float, soft_cap: float | None, G: int, Gp: int, page_size: int,
            pages_per_block: int, blocks_per_split: int, head_dim: int, window: int | None = None,
            num_splits: int = 1):
    b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    seq_len = lens_ref[b]
    layer = layer_ref[0]
    T = pages_per_block * page_size
    rows = jnp.minimum(jnp.arange(Gp), G - 1)                       # [Gp] padded rows repeat row G-1
    q = q_ref[b, h * G + rows, :]                                    # [Gp, Dp] gather, registers only
    Dp = q.shape[-1]                                                 # pow2(head_dim): q arrives zero-padded
    if Dp == head_dim:
        lanes = (slice(None),)                                       # K/V rows: Dh contiguous elements
    else:                                                            # lanes d >= Dh: clamped (valid) loads,
        lanes = (jnp.minimum(jnp.arange(Dp), head_dim - 1)[None, :],)   # zeros in q cancel them in q @ K^T
    tf32 = q.dtype != jnp.float32                                    # f32 caches: exact f32 dots on GPU
    if window is None:
        tok0 = sp * blocks_per_split * T                             # first token of this split
        span = jnp.clip(seq_len - tok0, 0, blocks_per_split * T)
    else:
        # Sliding window: keys at positions >= lo. The walk starts at the first page holding one
        # (page-aligned ``start``) and the row's live blocks are cut evenly over the splits, so the
        # pages before it are never loaded (dynamic loop bounds, not a mask).
        lo = jnp.maximum(seq_len - window, 0)
        start = lo // page_size * page_size
        per = ((seq_len - start + T - 1) // T + num_splits - 1) // num_splits    # blocks per split
        tok0 = start + sp * per * T
        span = jnp.clip(seq_len - tok0, 0, per * T)
    n_iter = (span + T - 1) // T
    tok = jnp.arange(T, dtype=jnp.int32)

    def body(i, carry):
        m, l, acc = carry
        t = tok0 + i * T + tok                                       # [T] token positions
        page = bt_ref[b, t // page_size]                             # [T] block-table gather
        off = t % page_size
        if Dp != head_dim:
            page, off = page[:, None], off[:, None]
        k = k_ref[(layer, h, page, off) + lanes]                     # [T, Dp] rows of Dh contiguous
        v = v_ref[(layer, h, page, off) + lanes]
        valid = t < seq_len                                          # [T]
        if window is not None:
            # Trims the head of the first page only. Positions < start are never visited (loop
            # bounds), so they are deliberately left unmasked: a bound that let one in would
            # show (the tests poison those pages with NaN).
            valid &= (t >= lo) | (t < start)
        s = plgpu.dot(q, k.astype(q.dtype), trans_b=True, allow_tf32=tf32).astype(jnp.float32) * scale   # [Gp, T]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))                   # [Gp]; finite: >= 1 valid token
        alpha = jnp.exp(m - m_new)                                   # exp(-inf) = 0 on the first block
        p = jnp.exp(s - m_new[:, None])
        v = jnp.where(valid[:, None], v, jnp.zeros_like(v))          # stale NaN must not reach 0 * NaN
        pv = plgpu.dot(p.astype(v.dtype), v, allow_tf32=tf32).astype(jnp.float32)        # [Gp, Dh]
        return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

    init = (jnp.full((Gp,), -jnp.inf, jnp.float32), jnp.zeros((Gp,), jnp.float32),
            jnp.zeros((Gp, Dp), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_iter, body, init)
    # Duplicated rows store the same values at row G-1: no mask needed.
    m_ref[b, h, sp, rows] = m
    l_ref[b, h, sp, rows] = l
    acc_ref[b, h, sp, rows, :] = acc


def default_splits(batch: int, kv_heads: int, num_blocks: int, target_programs: int = 264) -> int:
    """Splits so that ``B * Hkv * splits`` reaches ~2 programs per H100 SM, each >= 2 token blocks."""
    want = max(1, target_programs // max(1, batch * kv_heads))
    return int(max(1, min(want, num_blocks // 2)))


def default_pages_per_block(page_size: int, max_pages: int) -> int:
    """~64 tokens per loop iteration (a power of two), never more pages than the table has."""
    return int(min(max(1, 64 // page_size), pow2(max_pages)))


def combine_splits(m, l, acc):
    """Log-sum-exp merge of split partials. m, l: f32[B, Hkv, n, G]; acc: f32[B, Hkv, n, G, Dh].

    Splits that saw no token have ``m = -inf`` and weight 0; rows with no token output 0."""
    m_all = jnp.max(m, axis=2, keepdims=True)
    m_all = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    w = jnp.where(jnp.isfinite(m), jnp.exp(m - m_all), 0.0)          # [B, Hkv, n, G]
    l_tot = jnp.sum(w * l, axis=2)                                    # [B, Hkv, G]
    acc = jnp.where(w[..., None] > 0, acc, 0.0)
    return jnp.sum(w[..., None] * acc, axis=2) / jnp.maximum(l_tot, 1e-30)[..., None]


def _check(q, k_cache, v_cache, block_tables, seq_lens, pages_per_block, num_splits):
    if q.ndim != 3 or k_cache.ndim != 5 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q[B, Hq, Dh] and k/v caches [L, Hkv, P, S, Dh]; got {q.shape}, "
                         f"{k_cache.shape}, {v_cache.shape}")
    B, Hq, Dh = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[3]
    if Hq % Hkv or k_cache.shape[4] != Dh:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv} and head dims must match")
    if block_tables.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError(f"block_tables {block_tables.shape} / seq_lens {seq_lens.shape} do not match B={B}")
    if pages_per_block is not None and pages_per_block < 1 or num_splits is not None and num_splits < 1:
        raise ValueError("pages_per_block and num_splits must be >= 1")
    if S & (S - 1):
        raise ValueError(f"page size {S} must be a power of two")


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "window", "num_splits", "pages_per_block",
                                             "num_warps", "num_stages", "backend", "interpret"))
def paged_attention(q, k_cache, v_cache, layer, block_tables, seq_lens, *, scale: float,
                    soft_cap: float | None = None, window: int | None = None, num_splits: int | None = None,
                    pages_per_block: int | None = None, num_warps: int = 4, num_stages: int = 2,
                    backend: str | None = None, interpret: bool = False):
    """Same contract as ``kernels.paged_attention.paged_attention_reference``.

    q: f[B, Hq, Dh]; k_cache, v_cache: f[L, Hkv, P, S, Dh]; layer: int or i32[];
    block_tables: i32[B, P_max]; seq_lens: i32[B]. Returns f[B, Hq, Dh] in q's dtype.
    Knobs: ``num_splits`` (split-K partitions, default from the grid), ``pages_per_block``
    (pages per loop iteration), ``num_warps``/``num_stages`` (Triton). ``backend``: "gpu"
    (Triton kernel, also used in interpret mode) or "tpu" (Mosaic TPU variant); default
    from ``jax.default_backend()``. ``window`` (static): sliding window, the row sees keys at
    positions ``>= seq_len - window``; the page walk starts at the first page holding one (pages
    wholly before the window are never read) and split-K cuts only the window's pages.
    """
    _check(q, k_cache, v_cache, block_tables, seq_lens, pages_per_block, num_splits)
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    backend = backend or ("tpu" if jax.default_backend() == "tpu" else "gpu")
    if backend == "tpu":
        from ferry.kernels import _tpu_paged_attention
        return _tpu_paged_attention.paged_attention(q, k_cache, v_cache, layer, block_tables, seq_lens,
                                                    scale=scale, soft_cap=soft_cap, window=window,
                                                    interpret=interpret)
    B, Hq, Dh = q.shape
    _, Hkv, _, S, _ = k_cache.shape
    G = Hq // Hkv
    Gp = max(16, pow2(G))
    Dp = pow2(Dh)                                                    # Triton tiles: powers of two
    P_max = block_tables.shape[1]
    ppb = pages_per_block or default_pages_per_block(S, P_max)
    n_blocks = -(-P_max // ppb)
    if window is None:
        n = min(num_splits or default_splits(B, Hkv, n_blocks), n_blocks)
        per = -(-n_blocks // n)                                       # token blocks per split
        width = per * n * ppb
    else:                          # a row's walk: at most window + S - 1 tokens, from a page start
        live = min(n_blocks, -(-(window + S - 1) // (ppb * S)))
        n = min(num_splits or default_splits(B, Hkv, live), live)
        per = -(-live // n)                                           # (the kernel sizes splits per row)
        width = (n_blocks + 1) * ppb                                  # page-aligned start: <= ppb - 1 pages over
    tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, width - P_max)))  # null page
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
    kernel = functools.partial(_kernel, scale=scale, soft_cap=soft_cap, G=G, Gp=Gp, page_size=S,
                               pages_per_block=ppb, blocks_per_split=per, head_dim=Dh, window=window,
                               num_splits=n)
    qp = q if Dp == Dh else jnp.pad(q, ((0, 0), (0, 0), (0, Dp - Dh)))   # zero lanes: exact scores
    whole = pl.no_block_spec                                          # every ref: raw pointer, indexed in-kernel
    extra = {}
    if not interpret:
        extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    m, l, acc = pl.pallas_call(
        kernel, grid=(B, Hkv, n), in_specs=[whole] * 6, out_specs=[whole] * 3,
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, n, G), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, n, G), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, n, G, Dp), jnp.float32)],
        interpret=interpret, name="ferry_paged_attention", **extra,
    )(seq_lens.astype(jnp.int32), tables, layer_arr, qp, k_cache, v_cache)
    return combine_splits(m, l, acc[..., :Dh]).reshape(B, Hq, Dh).astype(q.dtype)

"""Decode paged attention in Pallas Mosaic GPU (Hopper: TMA page copies into an SMEM ring, WGMMA).

Contract: ``kernels.paged_attention.paged_attention_reference`` (cache ``f[L, Hkv, P, S, Dh]`` +
layer index, ``q: f[B, Hq, Dh]``, ``block_tables: i32[B, P_max]``, ``seq_lens: i32[B]``; rows
with ``seq_len == 0`` output 0; stale values, NaN included, past ``seq_len`` never leak).

Status: selectable, NOT the default. ``choose_kernels`` / the engine keep the Triton kernel
(``kernels/paged_attention_pallas.py``) until a GPU session measures both: this variant was
written without a GPU. It is lowered for CUDA on the CPU host (the Mosaic GPU module is built
and serialized into a ``mosaic_gpu_v2`` custom call: ``tests/kernels/test_lowering.py``), but
ptxas / the Hopper run, and so correctness on hardware and speed, are unverified; see
docs/KERNELS.md "Mosaic GPU decode variant".

Design. Grid ``(B, Hkv)``, one warpgroup per program (one row, one KV head, so every K/V byte
is read once). The ``G = Hq / Hkv`` query heads of the KV head sit in a ``[64, Dh]`` tile (WGMMA's
minimum M; the rows past G are zeros, padded in HBM outside the kernel: ``B * Hkv * 64 * Dh``
elements, small next to the KV). The row's sequence length, the layer and its block table are
packed by XLA into one ``i32`` row (``meta[b] = [seq_len, layer, 0, 0, table...]``) and copied
to SMEM once. The page walk takes ``T = 64`` tokens per step (``64 / S`` pages): one TMA copy per
page into a ``[T, Dh]`` slot of a ``max_concurrent_steps``-deep SMEM ring (one barrier per slot,
one arrival per page copy), issued ``max_concurrent_steps`` blocks ahead of the compute.
Per step: ``s = q @ K^T`` (WGMMA, f32 accumulator ``[64, T]``), mask ``t >= seq_len`` to -inf,
online softmax in f32, V rows past ``seq_len`` zeroed in SMEM on the last block only (a stale
NaN must not meet ``0 * NaN`` inside the MMA), ``acc += p @ V`` (WGMMA). The output tile goes
back through SMEM with one TMA store; XLA slices rows ``< G``. Sliding window (``window``): the
walk, and so its TMA copies, starts at the page holding ``seq_len - window``; V rows before it in
that first block are zeroed in SMEM like the rows past ``seq_len`` in the last one.

Why it might beat the Triton kernel (to be measured): TMA moves each 4 KiB page (S=16, Dh=128,
bf16) with one instruction and no register traffic, the ring keeps ``max_concurrent_steps`` x
``T`` tokens in flight per SM, and the softmax overlaps the copies. Why it might not: WGMMA's 64
rows mean 16x padding of G=4 (compute is far from the bound in decode, but the ``[64, T]`` f32
scores cost registers), one page per TMA is a small copy, and there is no split-K, so B * Hkv
programs must fill the SMs (B=1 with 8 KV heads uses 8 of 132 SMs: the Triton kernel's split-K
is the better design there).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64                       # WGMMA's M
BLOCK_TOKENS = 64               # tokens per step (N of q @ K^T, K of p @ V)
META = 4                        # meta row: [seq_len, layer, 0, 0, table...]


def _check(q, k_cache, v_cache, block_tables, seq_lens):
    if q.ndim != 3 or k_cache.ndim != 5 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q[B, Hq, Dh] and k/v caches [L, Hkv, P, S, Dh]; got {q.shape}, {k_cache.shape}")
    B, Hq, Dh = q.shape
    _, Hkv, _, S, _ = k_cache.shape
    if Hq % Hkv or k_cache.shape[4] != Dh or Hq // Hkv > ROWS:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv} (at most {ROWS} q heads per KV head), "
                         f"head dims must match")
    if block_tables.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError(f"block_tables {block_tables.shape} / seq_lens {seq_lens.shape} do not match B={B}")
    if S > BLOCK_TOKENS or BLOCK_TOKENS % S:
        raise ValueError(f"page size {S} must divide {BLOCK_TOKENS}")
    if Dh % 64:
        raise ValueError(f"head dim {Dh} must be a multiple of 64 (128-byte swizzle)")
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or k_cache.dtype != q.dtype:
        raise ValueError(f"Mosaic GPU variant: bf16/f16 q and caches of one dtype, got {q.dtype}, {k_cache.dtype}")


def _kernel(q_hbm, k_hbm, v_hbm, meta_hbm, o_hbm, q_smem, k_smem, v_smem, meta_smem, o_smem,
            meta_bar, q_bar, k_bars, v_bars, *, scale, soft_cap, page_size, steps, head_dim, interpret,
            window=None):
    b, h = lax.axis_index("b"), lax.axis_index("h")
    ppb = BLOCK_TOKENS // page_size
    plgpu.copy_gmem_to_smem(meta_hbm.at[b], meta_smem, meta_bar.at[0])
    plgpu.copy_gmem_to_smem(q_hbm.at[b, h], q_smem, q_bar.at[0])
    plgpu.barrier_wait(meta_bar.at[0])
    seq_len = meta_smem[0]
    layer = meta_smem[1]
    if window is None:
        first, start = 0, 0
    else:                       # sliding window: keys >= lo; the walk starts at the page holding lo,
        lo = jnp.maximum(seq_len - window, 0)                           # so no TMA copy is issued for
        first = lo // page_size                                         # the pages before it
        start = first * page_size
    n_blocks = (seq_len - start + BLOCK_TOKENS - 1) // BLOCK_TOKENS

    def issue(blk, slot):
        for j in range(ppb):                                            # one TMA copy per page
            page = meta_smem[META + first + blk * ppb + j]
            dst = pl.ds(j * page_size, page_size)
            plgpu.copy_gmem_to_smem(k_hbm.at[layer, h, page], k_smem.at[slot, dst], k_bars.at[slot])
            plgpu.copy_gmem_to_smem(v_hbm.at[layer, h, page], v_smem.at[slot, dst], v_bars.at[slot])

    for s in range(steps):
        pl.when(s < n_blocks)(functools.partial(issue, s, s))
    plgpu.barrier_wait(q_bar.at[0])

    wgmma = plgpu.Layout.WGMMA
    cast = (lambda x, layout: x) if interpret else plgpu.layout_cast    # interpret mode: no layouts

    def iota(shape, dim):
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=None if interpret else wgmma)
    m_i = cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), wgmma.reduce(1))
    l_i = cast(jnp.full((ROWS,), 0.0, jnp.float32), wgmma.reduce(1))
    acc = cast(jnp.full((ROWS, head_dim), 0.0, jnp.float32), wgmma)

    def body(blk, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(blk, steps)
        plgpu.barrier_wait(k_bars.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
            return acc_ref[...]
        if interpret:                         # interpret mode has no WGMMA on a transposed ref: same product
            s = lax.dot_general(q_smem[...], k_smem[slot], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * scale
        else:
            s = pl.run_scoped(qk, plgpu.ACC((ROWS, BLOCK_TOKENS), jnp.float32)) * scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        tok = start + blk * BLOCK_TOKENS + iota((ROWS, BLOCK_TOKENS), 1)
        valid = tok < seq_len
        if window is not None:                  # the first page's head; positions < start are never
            valid &= (tok >= lo) | (tok < start)    # visited (deliberately unmasked: tests poison them)
        s = jnp.where(valid, s, -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=1))                         # finite: >= 1 valid token per block
        alpha = jnp.exp(m_i - m_new)
        p = jnp.exp(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(v_bars.at[slot])

        edge = blk == n_blocks - 1                                       # stale rows past seq_len: zero
        if window is not None:
            edge |= blk == 0                                             # and the rows before lo

        @pl.when(edge)
        def _mask_v():
            row = start + blk * BLOCK_TOKENS + iota((BLOCK_TOKENS, head_dim), 0)
            keep = row < seq_len
            if window is not None:
                keep &= (row >= lo) | (row < start)
            v = v_smem[slot]
            v_smem[slot] = jnp.where(keep, v, jnp.zeros_like(v))
            plgpu.commit_smem()

        def pv(acc_ref):                                                 # a fresh accumulator (not
            plgpu.wgmma(acc_ref, p.astype(v_smem.dtype), v_smem.at[slot])   # run_state: interpret mode
            return acc_ref[...]                                          # has no rule for it)
        if interpret:                         # nor WGMMA with a register operand
            acc = acc + lax.dot_general(p.astype(v_smem.dtype), v_smem[slot], (((1,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)
        else:
            acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, head_dim), jnp.float32))
        nxt = blk + steps                                                # the slot is free again: refill it
        pl.when(nxt < n_blocks)(lambda: issue(nxt, slot))
        return acc, m_new, l_i

    acc, m_i, l_i = lax.fori_loop(0, n_blocks, body, (acc, m_i, l_i))
    out = acc / lax.broadcast_in_dim(jnp.maximum(l_i, 1e-30), acc.shape, [0])
    o_smem[...] = out.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_hbm.at[b, h])
    plgpu.wait_smem_to_gmem(0)


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams   # private, JAX 0.10
    return InterpretGPUParams()


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "window", "max_concurrent_steps", "interpret"))
def paged_attention(q, k_cache, v_cache, layer, block_tables, seq_lens, *, scale: float,
                    soft_cap: float | None = None, window: int | None = None, max_concurrent_steps: int = 2,
                    interpret: bool = False):
    """Same contract as ``kernels.paged_attention.paged_attention_reference`` (see module docstring).

    q: bf16/f16[B, Hq, Dh] (Dh a multiple of 64); k_cache, v_cache: [L, Hkv, P, S, Dh] of q's dtype
    (S divides 64); layer: int or i32[]; block_tables: i32[B, P_max]; seq_lens: i32[B].
    ``max_concurrent_steps``: depth of the SMEM ring (64-token blocks in flight per program).
    ``interpret``: True runs Mosaic GPU's interpret mode on the CPU (it simulates SMEM, TMA and
    barriers; JAX >= 0.10's private ``InterpretGPUParams``); there the two products are plain dots,
    since that mode has no WGMMA on a transposed ref or a register operand.
    ``window`` (static): sliding window, keys at positions ``>= seq_len - window``; the page walk
    (and its TMA copies) starts at the page holding the first of them."""
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    B, Hq, Dh = q.shape
    _, Hkv, _, S, _ = k_cache.shape
    G = Hq // Hkv
    ppb = BLOCK_TOKENS // S
    P_max = block_tables.shape[1]
    n_tab = (-(-P_max // ppb) + (window is not None)) * ppb                  # window: walk from a page start
    n_pages = n_tab + (-(META + n_tab)) % 32                                  # table padded: whole blocks,
    meta = jnp.concatenate([                                                  # row a multiple of 128 bytes
        seq_lens.astype(jnp.int32)[:, None],
        jnp.broadcast_to(jnp.asarray(layer, jnp.int32), (B, 1)),
        jnp.zeros((B, META - 2), jnp.int32),
        jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, n_pages - P_max))),   # null page 0
    ], axis=1)
    q_rows = jnp.pad(q.reshape(B, Hkv, G, Dh), ((0, 0), (0, 0), (0, ROWS - G), (0, 0)))   # [B, Hkv, 64, Dh]
    steps = max(1, min(max_concurrent_steps, n_pages // ppb))
    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    dtype = q.dtype
    kernel = functools.partial(_kernel, scale=float(scale), soft_cap=soft_cap, page_size=S, steps=steps,
                               head_dim=Dh, interpret=bool(interpret),
                               window=window)
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((B, Hkv, ROWS, Dh), dtype),
        scratch_types=[
            plgpu.SMEM((ROWS, Dh), dtype, transforms=tiles),
            plgpu.SMEM((steps, BLOCK_TOKENS, Dh), dtype, transforms=tiles),
            plgpu.SMEM((steps, BLOCK_TOKENS, Dh), dtype, transforms=tiles),
            plgpu.SMEM((META + n_pages,), jnp.int32),
            plgpu.SMEM((ROWS, Dh), dtype, transforms=tiles),
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_arrivals=ppb, num_barriers=steps),
            plgpu.Barrier(num_arrivals=ppb, num_barriers=steps),
        ],
        grid=(B, Hkv), grid_names=("b", "h"),
        compiler_params=plgpu.CompilerParams(approx_math=False),
        interpret=_interpret_params() if interpret else None,
    )(q_rows, k_cache, v_cache, meta)
    return out[:, :, :G, :].reshape(B, Hq, Dh)

"""Decode paged attention, Mosaic TPU variant (block tables via scalar prefetch).

Why it differs from the Triton kernel: a TPU kernel cannot gather rows by
pointer arithmetic; data reaches VMEM only through DMAs described by BlockSpec
index maps (or explicit async copies). So the block table, sequence lengths and
layer index are scalar-prefetched into SMEM and the K/V BlockSpecs pick one page
per grid step: grid ``(B, Hkv, P_max)``, the last axis sequential ("arbitrary")
carrying the online softmax state in VMEM scratch. Pages past a row's length map
to the row's last valid page, so the pipeline sees the same block index and
skips the copy; their compute is skipped with ``pl.when``. Sliding window: the page
axis has only as many steps as a window spans, and step ``p`` maps to the row's page
``first + p`` (``first``: the page of ``seq_len - window``), so pages before the
window are never copied. Same contract as
``kernels.paged_attention.paged_attention_reference``.

Tested on CPU in Pallas interpret mode only (no TPU in this project's sessions).
``tests/kernels/test_lowering.py`` lowers it to a Mosaic module for TPU v4 / v5e /
v6e on a CPU host (under an abstract mesh naming the chip); Mosaic's layout
passes, which decide whether ``G x Dh`` blocks with G < 8 tile, run in libtpu at
compile time and are unverified.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _first_page(seq_len, window: int | None, page_size: int):
    """The first page holding a key the row sees: 0, or with a window the page of ``seq_len - window``."""
    if window is None:
        return 0
    return jnp.maximum(seq_len - window, 0) // page_size


def _kernel(lens_ref, bt_ref, layer_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *,
            scale: float, soft_cap: float | None, page_size: int, window: int | None = None):
    b, step = pl.program_id(0), pl.program_id(2)
    seq_len = lens_ref[b]
    first = _first_page(seq_len, window, page_size)
    p = first + step                                                        # the page this step holds

    @pl.when(step == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(p * page_size < seq_len)
    def _page():
        q = q_ref[...].astype(jnp.float32)                                  # [G, Dh]
        k = k_ref[...].astype(jnp.float32)                                  # [S, Dh]
        v = v_ref[...].astype(jnp.float32)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        pos = p * page_size + jax.lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
        valid = pos < seq_len                                               # [1, S]
        if window is not None:
            valid &= pos >= seq_len - window                                # head of the first page
        s = jnp.where(valid, s, -jnp.inf)                                   # [G, S]
        m_old = m_sc[...]                                                   # [G, 1]
        m_new = jnp.maximum(m_old, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_old - m_new)
        pr = jnp.exp(s - m_new)
        v = jnp.where(valid.reshape(page_size, 1), v, 0.0)                  # stale NaN must not leak
        l_sc[...] = l_sc[...] * alpha + jnp.sum(pr, axis=1, keepdims=True)
        acc_sc[...] = acc_sc[...] * alpha + jnp.dot(pr, v, preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(step == pl.num_programs(2) - 1)
    def _done():
        o_ref[...] = (acc_sc[...] / jnp.maximum(l_sc[...], 1e-30)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "window", "interpret"))
def paged_attention(q, k_cache, v_cache, layer, block_tables, seq_lens, *, scale: float,
                    soft_cap: float | None = None, window: int | None = None, interpret: bool = False):
    """q: f[B, Hq, Dh]; k_cache, v_cache: f[L, Hkv, P, S, Dh]; block_tables: i32[B, P_max];
    seq_lens: i32[B]. Returns f[B, Hq, Dh] (rows with ``seq_len == 0`` give 0).
    ``window``: sliding window (keys at positions ``>= seq_len - window``). The page axis of the
    grid then has ``min(P_max, ceil((window + S - 1) / S))`` steps and step ``p`` holds the row's
    page ``first + p`` (``first``: the page of ``seq_len - window``), so pages before the window
    are never copied into VMEM."""
    B, Hq, Dh = q.shape
    _, Hkv, _, S, _ = k_cache.shape
    G = Hq // Hkv
    P_max = block_tables.shape[1]
    qg = q.reshape(B, Hkv, G, Dh)

    def kv_map(b, h, p, lens, bt, layer_ref):
        last = jnp.maximum((lens[b] + S - 1) // S - 1, 0)                  # pages past the end: no new DMA
        return layer_ref[0], h, bt[b, jnp.minimum(_first_page(lens[b], window, S) + p, last)], 0, 0

    steps = P_max if window is None else min(P_max, -(-(window + S - 1) // S))   # pages a window spans

    kv_spec = pl.BlockSpec((None, None, None, S, Dh), kv_map)
    qo_spec = pl.BlockSpec((None, None, G, Dh), lambda b, h, p, *_: (b, h, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(B, Hkv, steps),
        in_specs=[qo_spec, kv_spec, kv_spec], out_specs=qo_spec,
        scratch_shapes=[pltpu.VMEM((G, 1), jnp.float32), pltpu.VMEM((G, 1), jnp.float32),
                        pltpu.VMEM((G, Dh), jnp.float32)])
    extra = {} if interpret else {"compiler_params": pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"))}
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale, soft_cap=soft_cap, page_size=S, window=window),
        grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((B, Hkv, G, Dh), q.dtype),
        interpret=interpret, name="ferry_paged_attention_tpu", **extra,
    )(seq_lens.astype(jnp.int32), block_tables.astype(jnp.int32), jnp.asarray(layer, jnp.int32).reshape(1),
      qg, k_cache, v_cache)
    return out.reshape(B, Hq, Dh)

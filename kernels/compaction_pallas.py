"""NonZero stream compaction in Pallas: per-block counts, exclusive scan, scatter.

Two kernels over blocks of ``block`` elements of the flattened input:
1. ``_count``: ``counts[i] = #nonzero in block i``  (one reduction per block);
2. XLA exclusive scan of ``counts`` (``n / block`` numbers, negligible);
3. ``_scatter``: each block ranks its non-zeros (in-block exclusive prefix sum)
   and writes their flat indices to ``offset[i] + rank``. Writes that would
   land past ``size`` go to a per-lane trash slot ``size + lane`` of a padded
   output buffer, so the kernel needs no masked store; the buffer arrives
   pre-filled with ``fill_value`` (aliased input), and is sliced to ``size``.
Reads n bytes of input twice and writes 4 * min(count, size) bytes: two passes
over the input is the bandwidth floor for an order-preserving compaction
without a decoupled look-back scan. N-D inputs are unravelled to row-major
coordinates afterwards (ONNX NonZero layout ``i32[ndim, size]``); entries at or
past ``count`` get ``fill_value`` by comparison with ``count`` (so any int fill
works). GPU: Triton lowering (``num_warps`` knob; the in-block ``cumsum`` lowers
to ``tt.scan``, the scatter to a pointer-array store).
Not compiled or measured on a GPU in this session (no device); tests run the
kernels in interpret mode against ``jnp.nonzero``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _count(x_ref, c_ref):
    c_ref[0] = jnp.sum((x_ref[...] != 0).astype(jnp.int32))


def _scatter(off_ref, x_ref, init_ref, out_ref, *, block: int, size: int):
    del init_ref                                             # aliased with out_ref (pre-filled)
    i = pl.program_id(0)
    mask = (x_ref[...] != 0).astype(jnp.int32)               # [block]
    rank = jnp.cumsum(mask) - mask                           # exclusive prefix within the block
    lane = jnp.arange(block, dtype=jnp.int32)
    dest = off_ref[i] + rank
    dest = jnp.where((mask == 1) & (dest < size), dest, size + lane)
    out_ref[dest] = i * block + lane


def _check(x, size: int, block: int):
    if x.ndim == 0:
        raise ValueError("nonzero needs an input with at least one dimension")
    if int(size) != size or size < 0:
        raise ValueError(f"size must be a non-negative int, got {size!r}")
    if block < 8 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 8, got {block}")


@functools.partial(jax.jit, static_argnames=("size", "fill_value", "block", "num_warps", "interpret"))
def nonzero(x, *, size: int, fill_value: int = -1, block: int = 1024, num_warps: int = 4,
            interpret: bool = False):
    """Same contract as ``kernels.compaction.nonzero_reference``.

    x: any dtype, shape [n] or N-D. Returns ``(indices, count)``: ``i32[size]`` (1-D) or
    ``i32[ndim, size]`` (N-D, row-major, ONNX NonZero layout), padded with ``fill_value``;
    ``count: i32[]`` is the true number of non-zeros (may exceed ``size``).
    Knobs: ``block`` (elements per program, power of two), ``num_warps`` (Triton).
    """
    _check(x, size, block)
    flat = x.reshape(-1)
    n = flat.shape[0]
    block = int(min(block, max(8, pl.next_power_of_2(max(n, 1)))))
    nb = max(1, -(-n // block))
    flat = jnp.pad(flat, (0, nb * block - n))                # zeros: never selected
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    counts = pl.pallas_call(
        _count, grid=(nb,), in_specs=[pl.BlockSpec((block,), lambda i: (i,))],
        out_specs=pl.BlockSpec((1,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((nb,), jnp.int32), interpret=interpret, name="ferry_nonzero_count",
        **extra,
    )(flat)
    offsets = jnp.cumsum(counts) - counts                    # exclusive scan over blocks: nb numbers
    init = jnp.full((size + block,), fill_value, jnp.int32)
    out = pl.pallas_call(
        functools.partial(_scatter, block=block, size=size), grid=(nb,),
        in_specs=[pl.no_block_spec, pl.BlockSpec((block,), lambda i: (i,)), pl.no_block_spec],
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((size + block,), jnp.int32), input_output_aliases={2: 0},
        interpret=interpret, name="ferry_nonzero_scatter", **extra,
    )(offsets, flat, init)
    idx = out[:size]
    count = jnp.sum(counts)
    if x.ndim == 1:
        return idx, count
    coords = jnp.stack(jnp.unravel_index(jnp.maximum(idx, 0), x.shape)).astype(jnp.int32)
    written = jnp.arange(size) < count                       # fill_value may be any int, even >= 0
    return jnp.where(written[None, :], coords, fill_value), count

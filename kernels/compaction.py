"""NonZero-style stream compaction with a static output size.

``nonzero(x, *, size, fill_value=-1) -> (indices, count)``: for 1-D ``x``,
``indices: i32[size]`` holds the positions of non-zero elements in increasing
order, padded with ``fill_value``; ``count: i32[]`` is the true number (may
exceed ``size``; then the first ``size`` are returned). For N-D ``x``,
``indices: i32[ndim, size]`` in row-major order (ONNX NonZero layout, the
order of ``jnp.nonzero``).
"""
from __future__ import annotations

import jax.numpy as jnp

from ferry.kernels.common import interpret, resolve_impl


def nonzero_reference(x, *, size: int, fill_value: int = -1):
    flat = (x != 0).reshape(-1)
    count = jnp.sum(flat, dtype=jnp.int32)
    pos = jnp.cumsum(flat, dtype=jnp.int32) - 1                      # exclusive rank
    dest = jnp.where(flat & (pos < size), pos, size)                 # size = dropped
    idx = jnp.full((size,), fill_value, jnp.int32)
    idx = idx.at[dest].set(jnp.arange(flat.shape[0], dtype=jnp.int32), mode="drop")
    if x.ndim == 1:
        return idx, count
    coords = jnp.stack(jnp.unravel_index(jnp.maximum(idx, 0), x.shape)).astype(jnp.int32)
    coords = jnp.where((jnp.arange(size) < count)[None, :], coords, fill_value)   # fill_value may be >= 0
    return coords, count


def nonzero(x, *, size: int, fill_value: int = -1, impl: str = "auto"):
    """Dispatch to the reference or the Pallas kernel (see module docstring)."""
    if resolve_impl(impl, "compaction") == "reference":               # Triton-only: TPU takes the reference
        return nonzero_reference(x, size=size, fill_value=fill_value)
    from ferry.kernels import compaction_pallas
    return compaction_pallas.nonzero(x, size=size, fill_value=fill_value, interpret=interpret())

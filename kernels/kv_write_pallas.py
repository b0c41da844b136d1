"""Write of a step's new K/V into the paged KV cache, in Pallas: Triton lowering on GPU, interpret mode on CPU.

Contract: ``kernels.prefill_attention.write_kv_reference``. Caches
``k_cache, v_cache: f[L, Hkv, P, S, Dh]`` (layers, KV heads, pages, page size,
head dim); ``k, v: f[T, Hkv, Dh]``; ``slot_mapping: i32[T]`` with
``slot = page * S + offset``. Token ``t`` goes to
``cache[layer, :, slot // S, slot % S, :]``; a slot outside ``[0, P * S)``
(``-1`` marks a padding token) is not written. Values are cast to the cache
dtype. Returns the updated caches; every element other than the written
``(layer, head, slot)`` rows is left untouched.

Design. One ``pallas_call`` writes both caches. Grid
``(ceil(T / tokens_per_block), Hkv)``: a program takes ``BT`` tokens of one KV
head, loads their ``[BT, Dh]`` K and V rows (a gather from ``k[T, Hkv, Dh]``,
rows of ``Dh`` contiguous elements) and stores each row at its slot's
``[layer, h, page, offset, :]`` address: ``Dh`` contiguous elements in the
cache layout, so every row is one vectorised store and no program ever touches
another's bytes (slots are distinct). The caches are passed whole
(``pl.no_block_spec``: raw pointers, indexed in the kernel) and aliased to the
outputs (``input_output_aliases``), so the kernel writes only the new rows:
inside the engine's jitted step, where the caches are donated, nothing else of
the cache is read or copied. (Called outside a jit with non-donated caches, XLA
must copy each cache once to keep the input alive, like any in-place update.)
Tokens past ``T`` in the last block are clamped to ``T - 1`` for the loads
(valid addresses, no padding copy of ``k``/``v``) and masked for the store;
padding and out-of-range slots are redirected to page ``P`` (one past the
end) and masked too: on GPU a masked lane is never dereferenced, and in
interpret mode the masked scatter writes the old value back to an
out-of-bounds index, which XLA drops, so it can never race with a real write.
A head dim that is not a power of two (Triton tiles must be) is padded to
``Dp = pow2(Dh)`` lanes in registers only: lanes ``d >= Dh`` load a clamped
(valid) element and are masked out of the store, again with their unclamped,
out-of-bounds index. The store indexes with integer arrays only
(``page[:, None], off[:, None], arange(Dp)[None, :]``): Pallas interpret mode
has no discharge rule for a masked store that mixes array indices with slices.
In the Triton lowering a Pallas store is a swap: it emits a masked load of the
old values before the masked store; the loaded values are unused (dead code
for Triton to drop; check in the profile if the write looks slow).

Cost: reads ``T * Hkv * Dh`` elements of each of k, v and writes the same
number into each cache: the bandwidth floor of the operation. The XLA scatter
reference writes the same bytes (in place when donated) but goes through XLA's
generic scatter emitter. ``layer`` may be a traced scalar (read from a
one-element ref).

Not compiled or timed on a GPU in the session that wrote it (no device):
``tests/kernels/test_kv_write.py`` checks interpret mode bit for bit against the
reference, and ``scripts/bench_kernels.py`` times it against the XLA scatter.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ferry.kernels.common import pow2


def _kernel(slot_ref, layer_ref, k_ref, v_ref, kc_in_ref, vc_in_ref, kc_ref, vc_ref, *, n_tokens: int,
            block: int, num_pages: int, page_size: int, head_dim: int):
    del kc_in_ref, vc_in_ref                                          # aliased with kc_ref, vc_ref
    i, h = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    t = i * block + jnp.arange(block, dtype=jnp.int32)                # [BT] token indices
    tc = jnp.minimum(t, n_tokens - 1)                                 # clamped: loads stay in bounds
    slot = slot_ref[tc]
    ok = (t < n_tokens) & (slot >= 0) & (slot < num_pages * page_size)
    slot = jnp.where(ok, slot, num_pages * page_size)                 # masked lanes: page P (never touched)
    page = jax.lax.div(slot, page_size)
    off = jax.lax.rem(slot, page_size)
    Dp = pow2(head_dim)                                              # Triton tiles: powers of two
    d = jnp.arange(Dp, dtype=jnp.int32)
    idx = (layer, h, page[:, None], off[:, None], d[None, :])         # [BT, Dp] addresses
    mask = ok[:, None]
    if Dp == head_dim:
        src = (tc[:, None], h, d[None, :])                            # [BT, Dh] rows of k / v
    else:                                                             # lanes d >= Dh: clamped loads, masked stores
        mask = mask & (d < head_dim)[None, :]
        src = (tc[:, None], h, jnp.minimum(d, head_dim - 1)[None, :])
    plgpu.store(kc_ref.at[idx], k_ref[src].astype(kc_ref.dtype), mask=mask)
    plgpu.store(vc_ref.at[idx], v_ref[src].astype(vc_ref.dtype), mask=mask)


def _check(k_cache, v_cache, k, v, slot_mapping, tokens_per_block):
    if k_cache.ndim != 5 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected k/v caches [L, Hkv, P, S, Dh] of one shape; got {k_cache.shape}, {v_cache.shape}")
    _, Hkv, _, _, Dh = k_cache.shape
    if k.shape != v.shape or k.ndim != 3 or k.shape[1:] != (Hkv, Dh):
        raise ValueError(f"expected k, v [T, {Hkv}, {Dh}]; got {k.shape}, {v.shape}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping {slot_mapping.shape} does not match T={k.shape[0]}")
    if tokens_per_block < 1 or tokens_per_block & (tokens_per_block - 1):
        raise ValueError(f"tokens_per_block={tokens_per_block} must be a power of two")


@functools.partial(jax.jit, static_argnames=("tokens_per_block", "num_warps", "interpret", "debug"))
def write_kv(k_cache, v_cache, layer, k, v, slot_mapping, *, interpret: bool = False,
             tokens_per_block: int = 32, num_warps: int = 4, debug: bool = False):
    """Same contract as ``kernels.prefill_attention.write_kv_reference`` (see module docstring).

    k_cache, v_cache: f[L, Hkv, P, S, Dh]; layer: int or i32[]; k, v: f[T, Hkv, Dh];
    slot_mapping: i32[T]. Returns ``(k_cache, v_cache)`` updated in place (aliased).
    Knobs: ``tokens_per_block`` (tokens per program, a power of two, capped at
    ``max(8, pow2(T))``), ``num_warps`` (Triton); ``debug`` prints the kernel jaxpr and,
    when lowered for GPU, the Triton IR (``pallas_call(debug=True)``).
    """
    _check(k_cache, v_cache, k, v, slot_mapping, tokens_per_block)
    T = k.shape[0]
    if T == 0:
        return k_cache, v_cache
    _, Hkv, P, S, Dh = k_cache.shape
    BT = int(min(tokens_per_block, max(8, pow2(T))))
    extra = {}
    if not interpret:
        extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    whole = pl.no_block_spec
    return pl.pallas_call(
        functools.partial(_kernel, n_tokens=T, block=BT, num_pages=P, page_size=S, head_dim=Dh),
        grid=(-(-T // BT), Hkv), in_specs=[whole] * 6, out_specs=[whole] * 2,
        out_shape=[jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={4: 0, 5: 1}, interpret=interpret, debug=debug, name="ferry_write_kv", **extra,
    )(slot_mapping.astype(jnp.int32), jnp.asarray(layer, jnp.int32).reshape(1), k, v, k_cache, v_cache)

"""Ragged paged attention: the rows of one step, each with its own number of query tokens.

One step packs decode rows (one query token) and prefill chunks of several
requests (many tokens) into one token array ``q: f[T, Hq, Dh]`` with the
absolute position of each token in ``positions: i32[T]``. ``RaggedLayout`` says
which tokens form which row, in two classes:

* **one-token rows** (decode rows): ``single_token: i32[Bs]`` (index into the
  token array, -1 = padding), ``single_tables: i32[Bs, P]``, ``single_lens:
  i32[Bs]`` (keys the row attends to = its position + 1; 0 = padding). They run
  through the decode kernel (``kernels.paged_attention``).
* **query blocks** of a multi-token row: ``block_start: i32[NB]`` (index of the
  block's first token, -1 = padding), ``block_len: i32[NB]`` (its tokens, at most
  ``q_block``), ``block_tables: i32[NB, P]`` (the row's pages). A row of n tokens
  is cut into ceil(n / q_block) blocks; each block attends causally to its row's
  cached keys 0..position through the prefill kernel (``kernels.prefill_attention``),
  batched over blocks.

The K/V of every token is written into its pages before attention (the caller's
``write_kv``), so a chunk attends to itself and to all earlier chunks of its request.
Each token belongs to at most one row; tokens of no row (padding) get output 0.

Why two classes instead of one kernel over ``cu_q_lens``: a decode row padded to
a query block would do ``q_block`` times its attention work, and a prefill chunk
cut into one-token rows would gather its pages once per token. The two classes
keep both at their single-purpose cost (blocks: about ``T / q_block + rows``
gathers of a row's pages). ``NB = T // q_block + R`` blocks always suffice for
T tokens in at most R multi-token rows.

Options: ``soft_cap`` (scores -> cap * tanh(scores / cap)) and ``window`` (sliding
window: a query at position p sees keys at positions > p - window). ``impl`` is
passed to both kernels ("reference" | "pallas" | "auto").
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ferry.kernels.paged_attention import paged_attention
from ferry.kernels.prefill_attention import prefill_attention


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["single_token", "single_tables", "single_lens",
                                "block_start", "block_len", "block_tables"],
                   meta_fields=["q_block", "context_pages"])
@dataclasses.dataclass(frozen=True)
class RaggedLayout:
    single_token: jax.Array    # i32[Bs]     token index of each one-token row, -1 = padding
    single_tables: jax.Array   # i32[Bs, P]
    single_lens: jax.Array     # i32[Bs]     keys attended (position + 1), 0 = padding
    block_start: jax.Array     # i32[NB]     first token of each query block, -1 = padding
    block_len: jax.Array       # i32[NB]     tokens in the block (<= q_block)
    block_tables: jax.Array    # i32[NB, P]
    q_block: int = 16          # static: query tokens per block
    context_pages: tuple[int, ...] = ()   # static: page-count buckets (ascending, the last <= P); () = all P

    @staticmethod
    def decode(block_tables, seq_lens, context_pages: tuple[int, ...] = ()) -> "RaggedLayout":
        """Every token is its own row (the decode program): token i is row i."""
        B, P = block_tables.shape
        empty = jnp.zeros((0,), jnp.int32)
        return RaggedLayout(jnp.arange(B, dtype=jnp.int32), block_tables, seq_lens,
                            empty, empty, jnp.zeros((0, P), jnp.int32), q_block=1, context_pages=context_pages)


def by_context(attend_over, tables, keys_needed, context_pages: tuple[int, ...], page_size: int):
    """``attend_over(tables[:, :P])`` for the smallest bucket P of ``context_pages`` whose pages hold
    ``keys_needed`` (i32[], the most keys any row attends to), chosen on device under ``lax.switch``.

    One program then serves every context length (the context is no longer a compiled-shape axis)
    while attention still reads only the pages of the bucket it needs: each branch is the same
    attention over a narrower table, so its cost is that of the bucket's own program."""
    if not context_pages:
        return attend_over(tables)
    if len(context_pages) == 1:
        return attend_over(tables[:, :context_pages[0]])
    bounds = jnp.asarray([p * page_size for p in context_pages[:-1]], jnp.int32)
    idx = jnp.sum((bounds < keys_needed).astype(jnp.int32))
    return jax.lax.switch(idx, [functools.partial(lambda t, P: attend_over(t[:, :P]), P=P) for P in context_pages],
                          tables)


def ragged_paged_attention(q, k_cache, v_cache, layer, positions, layout: RaggedLayout, *, scale: float,
                           soft_cap: float | None = None, window: int | None = None, impl: str = "auto",
                           single_impl: str | None = None):
    """o: f[T, Hq, Dh] for q: f[T, Hq, Dh] (see module docstring). ``single_impl`` overrides
    ``impl`` for the one-token rows (the engine chooses each kernel separately)."""
    T = q.shape[0]
    o = jnp.zeros_like(q)
    lo = layout
    if lo.single_token.shape[0]:
        idx = lo.single_token
        qs = q[jnp.clip(idx, 0, T - 1)]                                            # [Bs, Hq, Dh]
        os_ = by_context(lambda tables: paged_attention(qs, k_cache, v_cache, layer, tables, lo.single_lens, scale=scale,
                                                        soft_cap=soft_cap, window=window, impl=single_impl or impl),
                         lo.single_tables, jnp.max(lo.single_lens), lo.context_pages, k_cache.shape[3])
        if lo.block_start.shape[0] == 0 and idx.shape[0] == T:
            o = jnp.where((idx >= 0)[:, None, None], os_, 0).astype(q.dtype)      # the decode program
        else:
            o = o.at[jnp.where(idx < 0, T, idx)].set(os_, mode="drop")
    if lo.block_start.shape[0]:
        Qb = lo.q_block
        tok = lo.block_start[:, None] + jnp.arange(Qb, dtype=jnp.int32)[None, :]  # [NB, Qb]
        valid = (lo.block_start[:, None] >= 0) & (jnp.arange(Qb)[None, :] < lo.block_len[:, None])
        safe = jnp.clip(tok, 0, T - 1)
        qb = q[safe]                                                                # [NB, Qb, Hq, Dh]
        pb = jnp.where(valid, positions[safe], -1)                                  # [NB, Qb]
        attend = functools.partial(prefill_attention, k_cache=k_cache, v_cache=v_cache, layer=layer,
                                   scale=scale, soft_cap=soft_cap, window=window, impl=impl)
        ob = by_context(lambda tables: jax.vmap(lambda qq, table, pos: attend(qq, block_table=table, positions=pos))(
            qb, tables, pb), lo.block_tables, jnp.max(pb) + 1, lo.context_pages, k_cache.shape[3])  # [NB, Qb, Hq, Dh]
        o = o.at[jnp.where(valid, tok, T)].set(ob, mode="drop")
    return o


def ragged_attention_naive(q, k_cache, v_cache, layer, positions, token_table, *, scale: float,
                           soft_cap: float | None = None, window: int | None = None):
    """Test oracle: every token on its own, over its row's pages (``token_table: i32[T, P]``;
    positions -1 = padding, output 0). Gathers T x P pages: for tests only."""
    T, Hq, Dh = q.shape
    _, Hkv, _, S, _ = k_cache.shape
    G = Hq // Hkv
    C = token_table.shape[1] * S
    k = k_cache[layer, :, token_table].transpose(0, 2, 1, 3, 4).reshape(T, Hkv, C, Dh).astype(jnp.float32)
    v = v_cache[layer, :, token_table].transpose(0, 2, 1, 3, 4).reshape(T, Hkv, C, Dh).astype(jnp.float32)
    s = jnp.einsum("thgd,thcd->thgc", q.reshape(T, Hkv, G, Dh).astype(jnp.float32), k) * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    key = jnp.arange(C)[None, :]
    mask = key <= positions[:, None]
    if window is not None:
        mask &= key > positions[:, None] - window
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(jnp.where(mask.any(-1)[:, None, None, None], s, 0.0), axis=-1)
    p = jnp.where(mask[:, None, None, :], p, 0.0)
    o = jnp.einsum("thgc,thcd->thgd", p, jnp.where(mask[:, None, :, None], v, 0.0))
    return o.reshape(T, Hq, Dh).astype(q.dtype)

"""Host side of the ragged step: pack one plan's rows into the arrays of ``step[T, C]``.

A step's rows are decode rows (one token, read on device from the row's slot) and
prefill chunks of several requests (tokens from the host). They are laid out in one
token array of a bucket size T, decode rows first, then each chunk's tokens
contiguously; the attention layout (kernels/ragged_attention.py) makes decode rows
one-token rows and cuts each chunk into query blocks of ``StepShape.q_block``.

Static sizes per ``(T, C)`` program (``StepShape``; C is the largest context, and attention
switches among ``context_pages`` on device):
  rows Bs = min(T, max_batch)      one-token rows and sampled rows (a step has at most
                                   max_batch rows: the scheduler's max_batch)
  chunks max_chunk_rows(T) = T/16  multi-token rows (engine/config.py; the scheduler's
                                   ``max_prefill_rows`` is that of the largest bucket)
  q_block = max(16, T // 8)        query tokens per block
  blocks NB = T // q_block + chunks
The block size trades padding (a block is computed whole) against gathers (each
block gathers its row's pages once): a single 256-token chunk costs 8 gathers of its
pages instead of one, which is noise beside its matmuls on the 2-core CPU.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ferry.engine.config import max_chunk_rows
from ferry.kernels.ragged_attention import RaggedLayout
from ferry.models.attention import AttnMeta


@dataclasses.dataclass(frozen=True)
class StepShape:
    tokens: int        # T
    context: int       # C (tokens covered by a row's block table)
    max_batch: int
    context_pages: tuple[int, ...] = ()   # attention's context buckets in pages (<= C / S); () = C only

    @property
    def rows(self) -> int:
        return min(self.tokens, self.max_batch)

    @property
    def q_block(self) -> int:
        return max(16, self.tokens // 8)

    @property
    def blocks(self) -> int:
        return self.tokens // self.q_block + self.chunks

    @property
    def chunks(self) -> int:
        return max_chunk_rows(self.tokens)


@dataclasses.dataclass(frozen=True)
class StepRow:
    """One row of a step (host side)."""

    start: int                     # position of the row's first token
    num_tokens: int                # tokens computed
    pages: list[int]               # the request's device pages
    tokens: list[int] | None       # None: a decode row, its one token read from ``slot`` on device
    slot: int | None               # sample the row's next token into this slot (None: no sample)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    tokens: jax.Array          # i32[T]   host tokens (0 where read from a slot)
    from_slot: jax.Array       # i32[T]   slot whose current token is this token, -1 = host token
    positions: jax.Array       # i32[T]   -1 = padding
    meta: AttnMeta             # slot mapping i32[T] + ragged layout
    sample_token: jax.Array    # i32[R]   token whose logits are sampled, -1 = padding row
    sample_slot: jax.Array     # i32[R]   slot that receives the sampled token


def fits(shape: StepShape, rows: list[StepRow]) -> bool:
    chunks = [r for r in rows if r.num_tokens > 1]
    return (sum(r.num_tokens for r in rows) <= shape.tokens and len(rows) <= shape.rows
            and len(chunks) <= shape.chunks and max((r.start + r.num_tokens for r in rows), default=0)
            <= shape.context)


def pack(shape: StepShape, rows: list[StepRow], page_size: int) -> tuple[StepInputs, list[int]]:
    """numpy ``StepInputs`` for ``rows`` (they must ``fit``) and the indices of the rows that
    sample, in the order of the sampled rows of the outputs."""
    if not fits(shape, rows):
        raise ValueError(f"{len(rows)} rows / {sum(r.num_tokens for r in rows)} tokens do not fit {shape}")
    T, S = shape.tokens, page_size
    P = shape.context // S
    R, NB, Qb = shape.rows, shape.blocks, shape.q_block
    tokens = np.zeros(T, np.int32)
    from_slot = np.full(T, -1, np.int32)
    positions = np.full(T, -1, np.int32)
    slots = np.full(T, -1, np.int32)
    single_token = np.full(R, -1, np.int32)
    single_tables = np.zeros((R, P), np.int32)
    single_lens = np.zeros(R, np.int32)
    block_start = np.full(NB, -1, np.int32)
    block_len = np.zeros(NB, np.int32)
    block_tables = np.zeros((NB, P), np.int32)
    sample_token = np.full(R, -1, np.int32)
    sample_slot = np.full(R, -1, np.int32)
    sampled: list[int] = []
    t = ns = nb = 0
    for r in sorted(range(len(rows)), key=lambda j: rows[j].num_tokens > 1):
        row = rows[r]
        n = row.num_tokens
        table = np.zeros(P, np.int32)
        pages = np.asarray(row.pages[:P], np.int32)
        table[:len(pages)] = pages
        pos = np.arange(row.start, row.start + n, dtype=np.int32)
        positions[t:t + n] = pos
        slots[t:t + n] = table[pos // S] * S + pos % S
        if row.tokens is None:
            from_slot[t] = row.slot
        else:
            tokens[t:t + n] = row.tokens
        if n == 1:
            single_token[ns], single_tables[ns], single_lens[ns] = t, table, row.start + 1
            ns += 1
        else:
            for b in range(0, n, Qb):
                block_start[nb], block_len[nb], block_tables[nb] = t + b, min(Qb, n - b), table
                nb += 1
        if row.slot is not None:
            sample_token[len(sampled)], sample_slot[len(sampled)] = t + n - 1, row.slot
            sampled.append(r)
        t += n
    layout = RaggedLayout(single_token, single_tables, single_lens, block_start, block_len, block_tables,
                          q_block=Qb, context_pages=shape.context_pages)
    return StepInputs(tokens, from_slot, positions, AttnMeta(slots, layout), sample_token, sample_slot), sampled

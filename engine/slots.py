"""Device-resident batch state: one slot per running sequence, updated in place.

``SlotState`` lives on device between steps (donated to every program that
changes it). A slot holds what the next decode iteration of its sequence
needs, so sampled tokens never round-trip through the host to feed the next
step:

    tokens:       i32[S]        input token of the slot's next decode iteration
    positions:    i32[S]        that token's position (= tokens whose KV is cached)
    block_tables: i32[S, P]     device pages of the sequence (P = max pages per sequence)
    sampling:     SamplingBatch per-slot parameters, step counter and stop ids ([S] rows)
    penalties:    Penalties     counts f32[S, V], seen bool[S, V] (presence/frequency/repetition)

``SlotTable`` is the host side: which request is bound to which slot, and a
numpy mirror of the small per-slot rows. The host sends only rows that changed
(a sequence joining the batch, a new page, a resumed sequence): ``flush()``
uploads the dirty rows, padded to a bucket of the decode batch sizes, and one
jitted ``apply_rows`` scatters them in. Host-to-device bytes per step are
O(changed rows x P), zero for a steady decode batch. Once bound, a slot's token,
position and step counter are the device's (see ``SlotTable.write``). Penalty statistics are
uploaded only for rows whose request uses penalties (``set_penalties``); other
rows are zeroed on device.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ferry.engine.sampling import Penalties, SamplingBatch, SamplingRow, host_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    tokens: jax.Array          # i32[S]
    positions: jax.Array       # i32[S]
    block_tables: jax.Array    # i32[S, P]
    sampling: SamplingBatch    # [S] rows
    penalties: Penalties       # f32[S, V], bool[S, V]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowUpdate:
    """Rows to write into a ``SlotState`` (n = a decode-batch bucket; idx -1 = padding)."""

    idx: jax.Array             # i32[n] slot of each row, -1 = padding
    tokens: jax.Array          # i32[n]
    positions: jax.Array       # i32[n]
    block_tables: jax.Array    # i32[n, P]
    sampling: SamplingBatch    # [n] rows
    full: jax.Array            # bool[n] a fresh binding: write the whole row and zero the slot's penalty
                               #         statistics; else only its block table (a new page)


def empty_state(num_slots: int, pages_per_seq: int, vocab: int) -> SlotState:
    S = num_slots
    sb = SamplingBatch(**{k: jnp.asarray(v) for k, v in host_rows([], S).items()})
    return SlotState(jnp.zeros(S, jnp.int32), jnp.zeros(S, jnp.int32), jnp.zeros((S, pages_per_seq), jnp.int32),
                     sb, Penalties(jnp.zeros((S, vocab), jnp.float32), jnp.zeros((S, vocab), bool)))


def apply_rows(state: SlotState, u: RowUpdate) -> SlotState:
    """Scatter ``u``'s rows into their slots (padding rows dropped; see ``RowUpdate.full``)."""
    S = state.tokens.shape[0]
    idx = jnp.where(u.idx < 0, S, u.idx)                       # out of range -> dropped
    fidx = jnp.where(u.full, idx, S)                           # whole rows only where full

    def put(dst, src):
        return dst.at[fidx].set(src.astype(dst.dtype), mode="drop")

    sampling = jax.tree.map(put, state.sampling, u.sampling)
    pen = Penalties(state.penalties.counts.at[fidx].set(0.0, mode="drop"),
                    state.penalties.seen.at[fidx].set(False, mode="drop"))
    return SlotState(put(state.tokens, u.tokens), put(state.positions, u.positions),
                     state.block_tables.at[idx].set(u.block_tables, mode="drop"), sampling, pen)


def set_penalties(state: SlotState, slot, counts, seen) -> SlotState:
    """Write one slot's penalty statistics (counts f32[V], seen bool[V]); slot: i32[]."""
    pen = Penalties(state.penalties.counts.at[slot].set(counts), state.penalties.seen.at[slot].set(seen))
    return dataclasses.replace(state, penalties=pen)


@dataclasses.dataclass
class SlotRow:
    """Host mirror of one slot (what was last written to the device)."""

    rid: str
    token: int
    position: int
    pages: list[int]
    sampling: SamplingRow


class SlotTable:
    """Host side of the slots: binding, dirty rows, and the upload batches (see module docstring)."""

    def __init__(self, num_slots: int, pages_per_seq: int, buckets: tuple[int, ...]) -> None:
        self.num_slots, self.pages_per_seq, self.buckets = num_slots, pages_per_seq, buckets
        self.rows: list[SlotRow | None] = [None] * num_slots     # last row written (None: not yet)
        self.owner: list[str | None] = [None] * num_slots         # request bound to each slot
        self.slot_of: dict[str, int] = {}
        self._dirty: dict[int, bool] = {}          # slot -> full row (else its block table only)
        self._pen_uploads: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._lru: dict[int, int] = {}             # slot -> last step it was used
        self._clock = 0

    def reset(self) -> None:
        """Forget every binding (the device state was rebuilt empty)."""
        self.rows = [None] * self.num_slots
        self.owner = [None] * self.num_slots
        self.slot_of.clear()
        self._dirty.clear()
        self._pen_uploads.clear()

    def lookup(self, rid: str) -> int | None:
        return self.slot_of.get(rid)

    def bind(self, rid: str, keep: set[str]) -> int:
        """A slot for ``rid``: its own, a free one, or the least recently used one whose request
        is not in ``keep`` (the requests of this step)."""
        s = self.slot_of.get(rid)
        if s is not None:
            return s
        free = [i for i, o in enumerate(self.owner) if o is None]
        if free:
            s = free[0]
        else:
            victims = [i for i, o in enumerate(self.owner) if o not in keep]
            if not victims:
                raise RuntimeError("more sequences in one step than batch slots")
            s = min(victims, key=lambda i: self._lru.get(i, -1))
            del self.slot_of[self.owner[s]]
        self.rows[s] = None
        self.owner[s] = rid
        self.slot_of[rid] = s
        return s

    def release(self, rid: str) -> None:
        s = self.slot_of.pop(rid, None)
        if s is not None:
            self.rows[s] = None
            self.owner[s] = None
            self._dirty.pop(s, None)

    def write(self, slot: int, row: SlotRow, penalties: tuple[np.ndarray, np.ndarray] | None) -> None:
        """A fresh binding: upload the whole row at the next flush (and ``penalties``: counts, seen
        of the request's tokens, when it uses penalties).

        From then on the slot is owned by the device: its token, position and step counter
        advance on device with every token sampled into it (the programs keep them equal to the
        scheduler's counts), so only a changed block table is uploaded (``set_pages``). The host
        therefore never needs tokens it has not read yet (dispatch-ahead)."""
        if self.rows[slot] is not None:
            raise RuntimeError(f"slot {slot} is bound to {self.rows[slot].rid!r}: use set_pages")
        self._lru[slot] = self._clock
        self.rows[slot] = row
        self._dirty[slot] = True
        if penalties is not None:
            self._pen_uploads.append((slot, *penalties))

    def set_pages(self, slot: int, pages: list[int]) -> None:
        """A bound slot's block table, uploaded at the next flush if it changed."""
        self._lru[slot] = self._clock
        row = self.rows[slot]
        if row.pages != pages:
            row.pages = list(pages)
            self._dirty.setdefault(slot, False)

    def tick(self) -> None:
        self._clock += 1

    def pending(self) -> bool:
        return bool(self._dirty) or bool(self._pen_uploads)

    def take_updates(self) -> tuple[RowUpdate | None, list[tuple[int, np.ndarray, np.ndarray]]]:
        """numpy ``RowUpdate`` of the dirty rows (padded to a bucket) and the penalty uploads."""
        pen, self._pen_uploads = self._pen_uploads, []
        if not self._dirty:
            return None, pen
        slots = sorted(self._dirty)
        n = next(b for b in self.buckets if b >= len(slots))
        P = self.pages_per_seq
        idx = np.full(n, -1, np.int32)
        toks = np.zeros(n, np.int32)
        pos = np.zeros(n, np.int32)
        tables = np.zeros((n, P), np.int32)
        full = np.zeros(n, bool)
        srows = []
        for i, s in enumerate(slots):
            r = self.rows[s]
            idx[i], toks[i], pos[i], full[i] = s, r.token, r.position, self._dirty[s]
            tables[i, :len(r.pages)] = r.pages[:P]
            srows.append(r.sampling)
        self._dirty = {}
        u = RowUpdate(idx, toks, pos, tables, SamplingBatch(**host_rows(srows, n)), full)
        return u, pen

"""Host side of the device slots: a fresh binding uploads its whole row, a bound slot only a changed
block table, and a bound slot is never overwritten with host values (the device owns its token)."""
import pytest

from ferry.engine.sampling import SamplingRow
from ferry.engine.sampling_params import SamplingParams
from ferry.engine.slots import SlotRow, SlotTable


def _row(rid, pages):
    return SlotRow(rid, 7, 3, pages, SamplingRow(SamplingParams(max_tokens=9), 1, 0))


def test_fresh_row_then_pages_only_then_nothing():
    t = SlotTable(num_slots=2, pages_per_seq=4, buckets=(1, 2))
    s = t.bind("a", {"a"})
    t.write(s, _row("a", [5]), None)
    u, pens = t.take_updates()
    assert list(u.idx) == [s] and list(u.full) == [True] and list(u.tokens) == [7] and not pens
    t.set_pages(s, [5])                                 # unchanged: nothing to send
    assert not t.pending() and t.take_updates() == (None, [])
    t.set_pages(s, [5, 6])                              # a new page: the table only
    u, _ = t.take_updates()
    assert list(u.idx) == [s] and list(u.full) == [False] and list(u.block_tables[0]) == [5, 6, 0, 0]


def test_write_refuses_a_bound_slot_and_rebinding_after_release_is_fresh():
    t = SlotTable(num_slots=1, pages_per_seq=2, buckets=(1,))
    s = t.bind("a", {"a"})
    t.write(s, _row("a", [1]), None)
    with pytest.raises(RuntimeError, match="use set_pages"):
        t.write(s, _row("a", [1]), None)
    t.release("a")
    s2 = t.bind("b", {"b"})                             # positive control: a released slot binds afresh
    t.write(s2, _row("b", [2]), None)
    u, _ = t.take_updates()
    assert list(u.full) == [True]


def test_a_slot_bound_but_not_yet_written_is_not_free():
    t = SlotTable(num_slots=2, pages_per_seq=2, buckets=(1, 2))
    a, b = t.bind("a", {"a", "b"}), t.bind("b", {"a", "b"})
    assert a != b
    with pytest.raises(RuntimeError, match="more sequences"):
        t.bind("c", {"a", "b", "c"})                    # both taken by this step's requests
    assert t.bind("c", {"c"}) in (a, b) and len(t.slot_of) == 2   # positive control: one is evicted

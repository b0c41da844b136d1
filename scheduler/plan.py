"""The contract between the scheduler (pure Python) and the engine (JAX).

Each iteration the engine calls ``Scheduler.schedule(now) -> Plan`` and executes
it in this order:

1. ``swap_out``: copy device page -> host page (then the device page is free),
2. ``swap_in``: copy host page -> device page (then the host page is free),
3. the compute ``work``: for each item, run the model over the request's tokens
   ``[num_computed, num_computed + num_tokens)``, writing their KV into the
   request's device pages (``Scheduler.block_table(request_id)``), which cover
   at least ``num_computed + num_tokens`` token slots. If the item reaches the
   end of the request's known tokens (``sample`` is True) the engine samples one
   new token from the last position.
   Items with ``num_tokens == 1`` are decode rows (batched into one decode
   call); longer items are prefill chunks (one prefill call each).
4. ``Scheduler.on_step_done(plan, now, finished=...)``.

``dropped`` lists requests whose device KV was discarded (recompute): the
engine needs to do nothing for them; they come back later as prefill work
from position 0 over prompt + generated tokens.

Tokens are owned by the engine; the scheduler counts them. A request's token
count grows by one for each ``WorkItem`` with ``sample=True``.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class WorkItem:
    request_id: str
    start: int         # == the request's num_computed at schedule time
    num_tokens: int    # tokens to compute this iteration (1 = decode row)
    sample: bool       # True when start + num_tokens == the request's token count


@dataclasses.dataclass(frozen=True)
class Plan:
    work: tuple[WorkItem, ...] = ()
    swap_out: tuple[tuple[int, int], ...] = ()   # (device_page, host_page)
    swap_in: tuple[tuple[int, int], ...] = ()    # (host_page, device_page)
    preempted: tuple[str, ...] = ()              # running last iteration, left out now (info)
    dropped: tuple[str, ...] = ()                # device KV discarded; will re-prefill (info)

    @property
    def decode_items(self) -> tuple[WorkItem, ...]:
        return tuple(w for w in self.work if w.num_tokens == 1)

    @property
    def prefill_items(self) -> tuple[WorkItem, ...]:
        return tuple(w for w in self.work if w.num_tokens > 1)

    @property
    def is_empty(self) -> bool:
        return not (self.work or self.swap_out or self.swap_in)

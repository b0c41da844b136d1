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
   Items with ``num_tokens == 1`` that sample are decode rows (batched into one
   decode call); the others are prefill chunks (one prefill call each).
4. ``Scheduler.on_step_done(plan, now, finished=...)``.

``decode_steps`` > 1 (multi-step decode) only when every item is a decode row and
no other job waits: the engine runs up to that many decode iterations in one
dispatch, a row stopping early at a stop id or its max_tokens. Each decode
row's pages already cover those iterations. ``on_step_done`` then takes the
number of tokens each request actually generated.

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
    decode_steps: int = 1                        # decode iterations in this dispatch (see below)

    @property
    def decode_items(self) -> tuple[WorkItem, ...]:
        """One token in, one sampled: the decode rows."""
        return tuple(w for w in self.work if w.num_tokens == 1 and w.sample)

    @property
    def prefill_items(self) -> tuple[WorkItem, ...]:
        """Everything else, a one-token chunk that samples nothing included (a token budget of 1)."""
        return tuple(w for w in self.work if not (w.num_tokens == 1 and w.sample))

    @property
    def kind(self) -> str:
        """The kind of dispatch the engine runs for it: "ragged" (prefill chunks, decode rows beside
        them or not), "decode_k1" (decode rows, one iteration) or "decode_multi" (decode_steps > 1)."""
        if self.prefill_items:
            return "ragged"
        return "decode_k1" if self.decode_steps == 1 else "decode_multi"

    @property
    def is_empty(self) -> bool:
        return not (self.work or self.swap_out or self.swap_in)

"""A job as the scheduler sees it: token counts, pages, queue, and a small state machine.

    WAITING --schedule--> RUNNING --left out--> PREEMPTED (KV kept on device)
       ^                     |  \\--offload--> SWAPPED (KV on host) --upload--> PREEMPTED
       |                     |                    |
       +---- recompute (KV dropped) <-------------+
    any --finish--> FINISHED          any --abort--> ABORTED

The engine owns the tokens; the scheduler only counts them: ``known`` tokens
(prompt + generated) of which ``num_computed`` have KV in the cache.
"""
from __future__ import annotations

import dataclasses
import enum


class State(enum.Enum):
    WAITING = "waiting"        # no KV anywhere (new, or dropped for recompute)
    RUNNING = "running"        # in the last iteration's batch
    PREEMPTED = "preempted"    # left out; KV on device
    SWAPPED = "swapped"        # left out; KV on host
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclasses.dataclass(eq=False)
class Job:
    rid: str
    prompt_len: int
    max_tokens: int
    arrival: float
    priority: int = 0
    length_hint: int | None = None  # predicted output tokens (a predictor's or the client's); MLFQ only
    state: State = State.WAITING
    generated: int = 0
    num_computed: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)        # device pages, in order
    host_pages: list[int] = dataclasses.field(default_factory=list)   # host pages while SWAPPED
    host_copy: list[int] = dataclasses.field(default_factory=list)    # while on device after a swap-in:
                                   # host pages still holding its first len(host_copy) (full, unchanged)
                                   # device pages; a later swap-out copies only the pages after them
    parked: list[int] = dataclasses.field(default_factory=list)       # while SWAPPED: the device pages
                                   # it left (free, parked); a swap-in takes back those still intact
    released: int = 0              # leading pages freed: outside the sliding window of every layer
                                   # (their block-table entries are the null page 0)
    queue: int = 0                 # MLFQ level (0 = highest priority; -1: the tail class)
    tail_from: int = 0             # MLFQ: the level it left for the tail class
    used: float = 0.0              # service the MLFQ quanta measure (seconds; see SkipJoinMLFQ.service)
    enqueued: float = 0.0          # when it entered its current queue (FCFS order inside a queue)
    last_run: float = 0.0          # last time it was in a batch (starvation guard)
    attained: float = 0.0          # cost-model seconds of its own work done so far (MLFQ level; never drops)
    served: float = 0.0            # seconds of iterations it was in the batch of (MLFQ tail guard)
    ahead: float = -1.0            # expected work (cost-model s) of the jobs before it when it arrived:
                                   # about its wait under FCFS (MLFQ tail guard; < 0 until measured)

    @property
    def known(self) -> int:
        return self.prompt_len + self.generated

    @property
    def prompt_left(self) -> int:
        """Prompt tokens still to prefill: the part of the remaining work that is known."""
        return max(0, self.prompt_len - self.num_computed)

    @property
    def done(self) -> bool:
        return self.state in (State.FINISHED, State.ABORTED)

    @property
    def num_pages(self) -> int:
        """Pages its block table covers (released ones included), wherever they are."""
        return self.released + (len(self.host_pages) if self.state == State.SWAPPED else len(self.pages))

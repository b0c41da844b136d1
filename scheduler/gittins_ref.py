"""Gittins reference: the order for mean JCT that does not know which job is long (simulator reference only).

It knows the DISTRIBUTION of output lengths (the ``max_tokens`` of every job added so far: the
simulator sets ``max_tokens`` to the true output length, so this is the arrived jobs' empirical
distribution, this job's own length included) but ranks each job only by what it has done: the
Gittins index (``scheduler/gittins.py``) at its exact number of generated tokens, in units of one
output token of work,

    G(g) = max over b > g of  (F(g) - F(b)) / sum_{t=g}^{b-1} F(t),   F(t) = P(length > t),

and for a job still prefilling, the index at age 0 with its prompt left counted as known work that
cannot end it (``k`` = its prefill time in output-token units): max over b of (1 - F(b)) / (k + sum_{t<b}
F(t)). Highest index first, ties by arrival; like the oracle it may evict anyone ranked below.

What it is for: where the MLFQ misses the average target, this says whether any non-clairvoyant order
could meet it. It has no quanta, no tail guard and no eviction gap (the MLFQ's costs for the tail and
for swap traffic), and the exact distribution from the start (the MLFQ learns it from finished jobs).
On one server the Gittins order minimises mean response time among policies that do not know job
sizes (Gittins 1989; Aalto, Ayesta and Righter 2009); with batching and a page budget it is a
reference, not a bound. It needs host room for every swapped job (the sweep gives 65,536 pages):
its index is not monotone in a job's progress, so when evictions drop KV (recompute) two jobs can
take turns evicting each other and lose their work forever (found by tests/scheduler/test_gittins_ref.py
with 400 host pages). The oracle cannot cycle (a job's remaining work only shrinks); the MLFQ's
page-accounting tests run with drops.
"""
from __future__ import annotations

import numpy as np

from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.gittins import last_observed_age, token_index
from ferry.scheduler.policy import Policy
from ferry.scheduler.request_state import Job

REBUILD_EVERY = 256    # after the first doublings (1, 2, 4, ... 128 jobs), rebuild every this many adds


def index_table(lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(F, G)`` for output ``lengths``: F[t] = P(length > t) for t = 0..max + 1, G[g] = the Gittins index
    at g tokens generated (``gittins.token_index``; 0 where F[g] = 0: no job of that age exists)."""
    L = np.asarray(lengths, dtype=np.int64)
    n = int(L.max()) + 1
    F = 1.0 - np.cumsum(np.bincount(L, minlength=n + 1))[: n + 1] / len(L)     # F[t] = P(L > t), t = 0..n
    return F, np.array([token_index(F, g) for g in range(n + 1)])


class GittinsReference(Policy):
    name = "gittins"

    def __init__(self, cost_model: CostModel, max_batch: int) -> None:
        super().__init__()
        self.cost = cost_model
        self.token_cost = cost_model.token_cost(max_batch)
        self.lengths: list[int] = []
        self.F = self.G = None
        self._stale = False

    def on_add(self, job: Job, now: float) -> None:
        super().on_add(job, now)
        self.lengths.append(job.max_tokens)
        n = len(self.lengths)
        self._stale |= (n & (n - 1)) == 0 or n % REBUILD_EVERY == 0

    def index(self, job: Job) -> float:
        if job.prompt_left > 0:
            return token_index(self.F, 0, known=self.cost.per_prefill_token * job.prompt_left / self.token_cost)
        return float(self.G[last_observed_age(self.F, job.generated)])   # past the last rebuild: its oldest

    def order(self, jobs: list[Job]) -> list[Job]:
        if self._stale:
            self.F, self.G = index_table(self.lengths)
            self._stale = False
        return sorted(jobs, key=lambda j: (-j.priority, -self.index(j), j.arrival))

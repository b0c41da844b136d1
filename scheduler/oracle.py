"""Oracle SRPT: shortest remaining processing time, knowing every job's true output length.

Reference only (an upper bound for the sweep, never a serving policy): it ranks
jobs by the cost-model time of the work they have left, i.e. the prompt tokens
still to prefill plus the output tokens still to generate, and reads the output
length from ``Job.max_tokens``. The simulator sets ``max_tokens`` to the trace's
true output length, so there the ranking is exact; in the real engine
``max_tokens`` is only a cap and the "oracle" would be a guess.

Why it is the reference: on one server with preemption (``max_batch=1``), SRPT
minimises total (hence average) completion time for any arrival sequence
(Schrage 1968); ``tests/scheduler/test_oracle.py`` checks the simulated policy
against a brute-force search over every schedule on small cases. With batching it
is a heuristic upper bound, not a proof; the sweep reports MLFQ against it.

Remaining time per job = ``per_prefill_token * prompt tokens left`` +
``output tokens left * token_cost``, with ``token_cost`` one decode row's share
of a full-batch decode step (``base / max_batch + per_decode_row``). Ties go to
the earlier arrival.
"""
from __future__ import annotations

from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.policy import Policy
from ferry.scheduler.request_state import Job


class OracleSRPT(Policy):
    name = "oracle"

    def __init__(self, cost_model: CostModel, max_batch: int) -> None:
        super().__init__()
        self.cost = cost_model
        self.token_cost = cost_model.token_cost(max_batch)

    def remaining(self, job: Job) -> float:
        """Cost-model seconds of the work ``job`` has left (exact output length assumed)."""
        out_left = max(0, job.max_tokens - job.generated)
        return self.cost.per_prefill_token * job.prompt_left + self.token_cost * out_left

    def order(self, jobs: list[Job]) -> list[Job]:
        return sorted(jobs, key=lambda j: (-j.priority, self.remaining(j), j.arrival, j.rid))

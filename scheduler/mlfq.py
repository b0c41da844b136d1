"""Skip-join multi-level feedback queue (FastServe, Wu et al., arXiv 2305.05920).

* K queues; queue i has quantum ``base_quantum * quantum_ratio**i`` seconds of
  iteration time (the last queue's quantum is unbounded in effect).
* Skip-join: a new job's first iteration (its prefill) is predicted from its
  prompt length by the cost model; it joins the highest queue whose quantum
  is at least that time, so long prompts skip queues they would leave at once.
* A job that used its queue's quantum is demoted one queue; used time resets.
* Order: highest non-empty queue first, FCFS (time of entering the queue)
  inside a queue. The Scheduler fills the batch in this order and preempts
  running jobs left out, at the token boundary.
* Starvation guard: a job that has not run for ``starve_limit`` seconds is
  promoted to Q0 (its used time resets).
Service time is charged from the cost model's iteration time, so decisions are
deterministic (same inputs, same plans: needed by multi-host lockstep and the
simulator).
"""
from __future__ import annotations

from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.policy import Policy
from ferry.scheduler.request_state import Job, State


class SkipJoinMLFQ(Policy):
    name = "mlfq"

    def __init__(self, cost_model: CostModel, num_queues: int = 6, base_quantum: float = 0.25,
                 quantum_ratio: float = 2.0, starve_limit: float = 30.0) -> None:
        super().__init__()
        if num_queues < 1 or base_quantum <= 0 or quantum_ratio < 1 or starve_limit <= 0:
            raise ValueError("MLFQ needs num_queues >= 1, base_quantum > 0, quantum_ratio >= 1, starve_limit > 0")
        self.cost = cost_model
        self.num_queues = num_queues
        self.quanta = [base_quantum * quantum_ratio ** i for i in range(num_queues)]
        self.starve_limit = starve_limit

    def join_queue(self, prompt_len: int) -> int:
        t = self.cost.prefill_time(prompt_len)
        return next((i for i, q in enumerate(self.quanta) if q >= t), self.num_queues - 1)

    def on_add(self, job: Job, now: float) -> None:
        super().on_add(job, now)
        job.queue = self.join_queue(job.prompt_len)
        job.used = 0.0

    def refresh(self, jobs: list[Job], now: float) -> None:
        for j in jobs:
            if j.state != State.RUNNING and j.queue > 0 and now - j.last_run >= self.starve_limit:
                j.queue, j.used, j.enqueued, j.last_run = 0, 0.0, now, now
                self.promotions += 1

    def order(self, jobs: list[Job]) -> list[Job]:
        return sorted(jobs, key=lambda j: (-j.priority, j.queue, j.enqueued, j.arrival))

    def on_served(self, job: Job, seconds: float, now: float) -> None:
        job.last_run = now
        job.used += seconds
        if job.used >= self.quanta[job.queue] and job.queue < self.num_queues - 1:
            job.queue += 1
            job.used = 0.0
            job.enqueued = now
            self.demotions += 1

    def queue_stats(self, waiting: list[Job]) -> dict[str, int]:
        counts = {f"waiting_q{i}": 0 for i in range(self.num_queues)}
        for j in waiting:
            counts[f"waiting_q{j.queue}"] += 1
        return counts

"""Build the policy a ``SchedulerConfig`` names: "mlfq" (serving default), "fcfs" (baseline),
"oracle" (SRPT knowing true output lengths), "gittins" (the Gittins order knowing only their
distribution), "ttft" (prefill first, shortest prompt left first) and "boost" (FCFS on arrival times
moved earlier for small jobs, knowing their sizes): simulator references only, see ``oracle.py``,
``gittins_ref.py``, ``ttft_ref.py`` and ``boost_ref.py``."""
from __future__ import annotations

from ferry.scheduler.boost_ref import BoostReference
from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.fcfs import FCFS
from ferry.scheduler.gittins_ref import GittinsReference
from ferry.scheduler.mlfq import SkipJoinMLFQ
from ferry.scheduler.oracle import OracleSRPT
from ferry.scheduler.policy import Policy
from ferry.scheduler.ttft_ref import PrefillFirst

POLICIES = ("mlfq", "fcfs", "oracle", "gittins", "ttft", "boost")


def make_policy(cfg, cost: CostModel) -> Policy:
    """``cfg`` is a ``SchedulerConfig``."""
    if cfg.policy == "fcfs":
        return FCFS()
    if cfg.policy == "oracle":
        return OracleSRPT(cost, cfg.max_batch)
    if cfg.policy == "gittins":
        return GittinsReference(cost, cfg.max_batch)
    if cfg.policy == "ttft":
        return PrefillFirst()
    if cfg.policy == "boost":
        return BoostReference(cost, cfg.max_batch, cfg.boost_scale)
    return SkipJoinMLFQ(cost, num_queues=cfg.num_queues, base_quantum=cfg.base_quantum,
                        quantum_ratio=cfg.quantum_ratio, starve_limit=cfg.starve_limit, max_batch=cfg.max_batch,
                        tail_slack=cfg.tail_slack)

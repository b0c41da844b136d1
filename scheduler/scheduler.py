"""The scheduler facade the engine and the simulator drive: one ``Plan`` per iteration.

Each ``schedule(now)``:
1. the policy refreshes priorities (starvation guard) and ranks live jobs;
2. the batch is filled in rank order up to ``max_batch`` rows and
   ``max_tokens_per_step`` tokens (prefill chunks <= ``max_prefill_chunk``, at most
   ``max_prefill_rows`` of them: the engine runs a plan as one ragged step);
   a job needing device pages gets them from the free pool, else by evicting
   lower-ranked jobs not in the batch: their KV is offloaded to host pages
   (swap-out) or, with no host room, dropped (recompute later);
3. a swapped job chosen to run is uploaded first (swap-in);
4. proactive KV management: while free device pages are under the watermark,
   the lowest-ranked idle jobs are offloaded ahead of need; while there is room
   above it, the highest-ranked swapped jobs are uploaded ahead of their turn
   (the copies overlap the step, JAX dispatch being asynchronous);
5. running jobs left out are preempted at the token boundary (KV stays put).
Every decision is in the returned Plan; pages are allocated when it is made.
Page moves (2-4) are recorded by ``scheduler/kv_planner.py``.

Time: MLFQ quanta are charged in cost-model iteration seconds (``CostModel``),
so the queue a job is in never depends on machine noise; ``now`` (wall clock in
the engine, simulated clock in the simulator) drives arrival order and the
starvation guard.
"""
from __future__ import annotations

import dataclasses
import numbers

from ferry.scheduler.block_manager import PagePool, check_ownership
from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.kv_planner import KVPlanner
from ferry.scheduler.plan import Plan, WorkItem
from ferry.scheduler.policies import POLICIES, make_policy
from ferry.scheduler.request_state import Job, State


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int
    max_tokens_per_step: int
    max_prefill_chunk: int
    page_size: int
    num_device_pages: int              # including the null page 0
    num_host_pages: int
    policy: str = "mlfq"               # "mlfq" | "fcfs" | "oracle" | "gittins" | "ttft" | "boost" (the last
                                       # four: simulator references, scheduler/oracle.py, gittins_ref.py,
                                       # ttft_ref.py, boost_ref.py)
    num_queues: int = 6
    base_quantum: float | None = None  # seconds of iteration time in Q0; None: derived (scheduler/mlfq.py)
    quantum_ratio: float = 2.0
    starve_limit: float | None = None  # hard cap, s without running -> promoted; None: derived (mlfq.py)
    offload_watermark: float = 0.10    # keep this fraction of device pages free (proactive offload)
    cost_model: CostModel | None = None
    decode_steps: int = 1              # most decode iterations per dispatch (multi-step decode)
    tail_slack: float = 2.0            # MLFQ tail guard: wait <= slack * (served + ahead + floor) (mlfq.py)
    max_prefill_rows: int | None = None  # multi-token (prefill chunk) rows per plan (the engine's step size)
    window: int | None = None          # sliding window (tokens) of EVERY layer: pages wholly before the
                                       # next query's window are freed (None: keep every page)
    boost_scale: float = 1.0           # boost reference: g = boost_scale / mean job size (boost_ref.py)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if min(self.max_batch, self.max_tokens_per_step, self.max_prefill_chunk, self.page_size) < 1:
            raise ValueError("max_batch, max_tokens_per_step, max_prefill_chunk and page_size must be >= 1")
        if not self.boost_scale > 0:
            raise ValueError(f"boost_scale must be > 0, got {self.boost_scale}")
        if self.num_device_pages < 2:
            raise ValueError("need at least 2 device pages (page 0 is the null page)")


class Scheduler:
    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.cost = cfg.cost_model or CostModel.cpu_default()
        self.policy = make_policy(cfg, self.cost)
        self.device = PagePool(cfg.num_device_pages, first=1)
        self.host = PagePool(cfg.num_host_pages)
        self.jobs: dict[str, Job] = {}
        self._last_cost = 0.0
        self.counters = {"preemptions": 0, "swap_out_pages": 0, "swap_in_pages": 0, "recomputes": 0,
                         "swap_out_pages_saved": 0, "swap_in_pages_saved": 0, "host_copy_pages_reclaimed": 0,
                         "finished": 0, "aborted": 0, "window_pages_freed": 0}

    # ------------------------------------------------------------------ jobs in / out
    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.cfg.page_size)

    def add(self, rid: str, prompt_len: int, max_tokens: int, now: float, priority: int = 0,
            length_hint: int | None = None) -> None:
        """Queue a job. ``length_hint``: a prediction of its output tokens (from a length predictor or
        the client), which the MLFQ ranks by (``mlfq.py``, change 11); other policies ignore it."""
        if rid in self.jobs:
            raise ValueError(f"duplicate request id {rid!r}")
        if prompt_len < 1 or max_tokens < 1:
            raise ValueError("prompt_len and max_tokens must be >= 1")
        if isinstance(priority, bool) or not isinstance(priority, numbers.Integral):
            raise ValueError(f"priority must be an int (higher runs first), got {priority!r}")
        if length_hint is not None and (isinstance(length_hint, bool) or not isinstance(length_hint, numbers.Integral)
                                        or length_hint < 1):
            raise ValueError(f"length_hint must be a positive int of output tokens, got {length_hint!r}")
        need = self.pages_for(prompt_len + max_tokens)
        if need > self.device.total:
            raise ValueError(f"request needs {need} KV pages but the device has {self.device.total}: "
                             f"prompt + max_tokens = {prompt_len + max_tokens} tokens is too long for this cache")
        job = Job(rid, prompt_len, max_tokens, now, priority=priority, length_hint=length_hint)
        self.policy.on_add(job, now)
        self.jobs[rid] = job

    def abort(self, rid: str) -> None:
        self._release(rid, State.ABORTED)

    def finish(self, rid: str) -> None:
        """Release a job that finished after its last ``on_step_done`` (the engine read its tokens
        one step later: dispatch-ahead)."""
        self._release(rid, State.FINISHED)

    def _release(self, rid: str, state: State) -> None:
        job = self.jobs.pop(rid, None)
        if job is None:
            return
        if state == State.FINISHED:
            self.policy.on_finish(job)
        self.device.free(job.pages)
        self.device.forget(job.parked, job.rid)
        self.host.free(job.host_pages + job.host_copy)
        job.pages, job.host_pages, job.host_copy, job.parked, job.state = [], [], [], [], state
        self.counters["finished" if state == State.FINISHED else "aborted"] += 1

    # ------------------------------------------------------------------ planning
    def schedule(self, now: float) -> Plan:
        cfg = self.cfg
        live = list(self.jobs.values())
        was_running = [j for j in live if j.state == State.RUNNING]
        self.policy.refresh(live, now, self.device.num_free / self.device.total)
        order = self.policy.order(live)
        rank = {j.rid: i for i, j in enumerate(order)}
        chosen: dict[str, WorkItem] = {}
        kv = KVPlanner(self.device, self.host, self.counters, cfg.page_size, [j for j in order if j.host_copy])
        budget = cfg.max_tokens_per_step
        chunks = 0                                              # multi-token rows chosen
        resident = [v for v in reversed(order) if v.pages]      # KV on device, lowest rank first
        resident_pages = sum(len(v.pages) for v in resident)
        chosen_resident_pages = 0                               # of those, held by chosen jobs

        def idle_on_device(below_rank: int) -> list[Job]:
            """Device-resident jobs ranked below ``below_rank`` and not in the batch, lowest first."""
            return [v for v in resident if rank[v.rid] > below_rank and v.rid not in chosen and v.pages]

        for job in order:
            if len(chosen) >= cfg.max_batch or budget < 1:
                break
            evictable = resident_pages - chosen_resident_pages - kv.freed_device
            if self.device.num_free + evictable == 0:
                break                         # every resident job is chosen; the rest need pages
            if job.rid in kv.evicted or job.generated >= job.max_tokens:
                continue                      # (at max_tokens: finished, its last tokens not yet read)
            need = job.known - job.num_computed
            n = 1 if need <= 1 else min(need, cfg.max_prefill_chunk, budget)
            if n > 1 and cfg.max_prefill_rows is not None and chunks >= cfg.max_prefill_rows:
                continue                      # the step holds no more chunks: decode rows may still join
            new = self.pages_for(job.num_computed + n) - job.num_pages
            want = max(new, 0) + (len(job.host_pages) if job.state == State.SWAPPED else 0)
            if self.device.num_free < want:
                if self.device.num_free + evictable < want:
                    continue                  # O(1) bound: long backlogs stay cheap to plan
                victims = [v for v in idle_on_device(rank[job.rid])   # an empty batch may evict anyone: progress
                           if not chosen or self.policy.may_evict(v, job)]
                if self.device.num_free + sum(len(v.pages) for v in victims) < want:
                    continue                  # cannot fit even after evicting: evict nobody in vain
                for victim in victims:
                    if self.device.num_free >= want:
                        break
                    kv.evict(victim, allow_drop=True)
            chosen_resident_pages += len(job.pages)
            if job.state == State.SWAPPED:
                kv.upload(job)
            if new > 0:
                job.pages += self.device.allocate(new)
            chosen[job.rid] = WorkItem(job.rid, job.num_computed, n, job.num_computed + n >= job.known)
            budget -= n
            chunks += n > 1

        kv.proactive([v for v in idle_on_device(-1) if self.policy.may_offload(v)], order, chosen,
                     int(cfg.offload_watermark * self.device.total))
        kv.finish()
        steps = self._decode_steps(live, chosen, kv)

        for job in live:
            if job.rid in chosen:
                job.state = State.RUNNING
            elif job.state == State.RUNNING and job.generated < job.max_tokens:
                job.state = State.PREEMPTED               # left out at the token boundary; KV stays
        # Running last iteration and left out now, wherever their KV went (kept, offloaded, dropped);
        # not those at max_tokens (done, their last tokens not read yet).
        preempted = [j.rid for j in was_running if j.rid not in chosen and j.generated < j.max_tokens]
        self.counters["preemptions"] += len(preempted)

        work = sorted(chosen.values(), key=lambda w: w.num_tokens == 1)       # prefill chunks first
        prefill = sum(w.num_tokens for w in work if w.num_tokens > 1)
        rows = sum(1 for w in work if w.num_tokens == 1)
        ctx = sum(w.start + w.num_tokens for w in work)
        self._last_cost = self.cost.iteration_time(prefill, rows, ctx, len(kv.swap_out) + len(kv.swap_in))
        self._last_cost += (steps - 1) * self.cost.iteration_time(0, rows, ctx + rows * steps // 2)
        return Plan(tuple(work), tuple(kv.swap_out), tuple(kv.swap_in), tuple(preempted), tuple(kv.dropped),
                    decode_steps=steps)

    def _decode_steps(self, live: list[Job], chosen: dict[str, WorkItem], kv: KVPlanner) -> int:
        """Multi-step decode: K = ``decode_steps`` iterations in one dispatch when the batch is all
        decode rows, no page moves are planned and no other job waits (a new arrival then waits at
        most one dispatch). Each row gets the pages for its K tokens now (capped by its
        max_tokens); if the free pool cannot hold them, K = 1. Returns the iterations the dispatch
        runs: K, or fewer when every row reaches its max_tokens sooner (the loop ends there)."""
        K = self.cfg.decode_steps
        waiting = [j for j in live if j.rid not in chosen and j.generated < j.max_tokens]
        if K <= 1 or not chosen or waiting or kv.swap_out or kv.swap_in or kv.dropped:
            return 1
        if any(w.num_tokens != 1 or not w.sample for w in chosen.values()):
            return 1
        extra, run = {}, 1
        for rid in chosen:
            job = self.jobs[rid]
            k = max(1, min(K, job.max_tokens - job.generated))
            extra[rid] = max(0, self.pages_for(job.num_computed + k) - job.num_pages)
            run = max(run, k)
        if sum(extra.values()) > self.device.num_free:
            return 1
        for rid, n in extra.items():
            if n:
                self.jobs[rid].pages += self.device.allocate(n)
        return run

    def on_step_done(self, plan: Plan, now: float, finished=(), generated: dict[str, int] | None = None) -> None:
        """Advance token counts, charge service time, release finished jobs.

        ``generated``: tokens each request produced in this dispatch when it differs from one
        per sampled item (multi-step decode: up to ``plan.decode_steps``, fewer for a row that
        stopped early)."""
        for w in plan.work:
            job = self.jobs.get(w.request_id)
            if job is None:                       # aborted while the step ran
                continue
            n = generated.get(w.request_id, 1) if generated is not None and w.sample else 1
            job.num_computed = w.start + w.num_tokens + (n - 1 if w.sample else 0)
            if w.sample:
                job.generated += n
            self._slide(job)
            self.policy.on_served(job, self._last_cost, now)
        for rid in finished:
            self._release(rid, State.FINISHED)

    def _slide(self, job: Job) -> None:
        """Free the leading device pages no later query can see: with window W every layer's query
        at position p >= num_computed sees keys > p - W, so a page whose last key is <= num_computed
        - W is dead. Dispatches already queued read them before any new owner's writes (device
        work is ordered). A swapped job keeps its host pages (it is not computing)."""
        W, S = self.cfg.window, self.cfg.page_size
        if W is None or not job.pages:
            return
        dead = min(max(0, (job.num_computed - W + 1) // S), job.num_pages - 1) - job.released
        if dead > 0:
            self.host.free(job.host_copy)           # the copy is aligned with block position 0
            job.host_copy = []
            self.device.free(job.pages[:dead])
            job.pages = job.pages[dead:]
            job.released += dead
            self.counters["window_pages_freed"] += dead

    @property
    def last_iteration_cost(self) -> float:
        """Cost-model seconds of the last planned iteration (the simulator's clock step)."""
        return self._last_cost

    # ------------------------------------------------------------------ queries
    def block_table(self, rid: str) -> list[int]:
        """Device pages by position; released pages (outside the sliding window) are the null page 0."""
        job = self.jobs[rid]
        return [0] * job.released + list(job.pages)

    def has_unfinished(self) -> bool:
        return bool(self.jobs)

    def num_waiting(self) -> int:
        return sum(1 for j in self.jobs.values() if j.state != State.RUNNING)

    @staticmethod
    def check_plan(plan: Plan) -> None:
        """Copies in one plan must not race: swap-outs run first, so none may overwrite a host
        page a swap-in reads, and no page is copied twice in one direction."""
        out_host = [h for _, h in plan.swap_out]
        in_host = [h for h, _ in plan.swap_in]
        assert not set(out_host) & set(in_host), "a swap-out overwrites a host page a swap-in reads"
        assert len(set(out_host)) == len(out_host) and len(set(in_host)) == len(in_host)
        assert len({d for d, _ in plan.swap_out}) == len(plan.swap_out)
        assert len({d for _, d in plan.swap_in}) == len(plan.swap_in)

    def check_invariants(self) -> None:
        """Every page free xor owned by exactly one live job (tests call this)."""
        check_ownership(self.jobs.values(), self.device, self.host)
        for j in self.jobs.values():
            assert not (j.pages and j.host_pages), f"{j.rid} has KV on device and host"
            assert not j.host_copy or (j.state in (State.RUNNING, State.PREEMPTED) and not j.released
                                       and len(j.host_copy) * self.cfg.page_size <= j.num_computed
                                       and len(j.host_copy) <= len(j.pages)), f"{j.rid} has a stale host copy"
            assert not j.parked or j.state == State.SWAPPED, f"{j.rid} holds parked pages while not swapped"
            assert j.state != State.SWAPPED or not j.pages, f"{j.rid} swapped but owns device pages"

    def stats(self) -> dict:
        jobs = list(self.jobs.values())
        waiting = [j for j in jobs if j.state != State.RUNNING]
        s = dict(self.policy.queue_stats(waiting))
        s.update(
            running=sum(j.state == State.RUNNING for j in jobs),
            preempted=sum(j.state == State.PREEMPTED for j in jobs),
            swapped=sum(j.state == State.SWAPPED for j in jobs),
            waiting=len(waiting),
            device_pages_used=self.device.num_used, device_pages_total=self.device.total,
            host_pages_used=self.host.num_used, host_pages_total=self.host.total,
            demotions=self.policy.demotions, promotions=self.policy.promotions, **self.counters)
        return s

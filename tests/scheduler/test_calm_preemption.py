"""MLFQ change 12: while the system is calm (fewer than max_batch / 8 jobs waiting and at least a quarter
of the device pages free), running jobs keep their slots; a higher-ranked newcomer takes the next free
one. Each condition alone lifts it (controls), and tail-class heads still go first."""
from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.mlfq import CALM_FREE_PAGES, SkipJoinMLFQ
from ferry.scheduler.request_state import Job, State
from ferry.scheduler.scheduler import Scheduler, SchedulerConfig

COST = CostModel(base=0.01, per_prefill_token=0.001, per_decode_row=0.001, per_context_token=0.0,
                 per_swap_page=0.0)


def _job(rid, queue, state, arrival=0.0):
    j = Job(rid, 8, 64, arrival)
    j.queue, j.num_computed, j.enqueued, j.state = queue, 8, arrival, state
    return j


def test_running_jobs_keep_their_slots_only_while_calm():
    m = SkipJoinMLFQ(COST, max_batch=32)
    assert m.calm_waiting == 4
    old = _job("old", 3, State.RUNNING)
    new = [_job(f"new{i}", 0, State.WAITING, arrival=1.0 + i) for i in range(4)]
    m.refresh([old, new[0]], 1.0, free_page_share=CALM_FREE_PAGES)
    assert m.calm and [j.rid for j in m.order([new[0], old])] == ["old", "new0"]
    m.refresh([old, new[0]], 1.0, free_page_share=CALM_FREE_PAGES - 0.01)      # KV getting tight
    assert not m.calm and [j.rid for j in m.order([new[0], old])] == ["new0", "old"]
    m.refresh([old] + new, 1.0, free_page_share=1.0)                           # four wait: congested
    assert not m.calm and m.order(new + [old])[-1].rid == "old"
    m.refresh([old, new[0]], 1.0)                                              # pool unknown: not calm
    assert not m.calm
    head = _job("head", -1, State.WAITING)
    head.tail_from = 2
    m.refresh([old, new[0], head], 1.0, free_page_share=1.0)
    assert m.calm and [j.rid for j in m.order([new[0], old, head])] == ["head", "old", "new0"]


def _two_running(num_device_pages):
    """Two decoding jobs demoted to queue 3 fill a two-token step; the caller adds newcomers."""
    s = Scheduler(SchedulerConfig(max_batch=32, max_tokens_per_step=2, max_prefill_chunk=64, page_size=4,
                                  num_device_pages=num_device_pages, num_host_pages=0, policy="mlfq",
                                  cost_model=COST))
    for rid in ("a", "b"):
        s.add(rid, 1, 3, 0.0)
    plan = s.schedule(0.0)
    assert sorted(w.request_id for w in plan.work) == ["a", "b"]
    s.on_step_done(plan, 0.01)
    for rid in ("a", "b"):
        s.jobs[rid].queue = 3
    return s


def test_the_scheduler_passes_its_free_pages():
    s = _two_running(101)                                   # plenty of pages, one newcomer: calm
    s.add("c", 1, 4, 1.0)
    plan = s.schedule(1.0)
    assert sorted(w.request_id for w in plan.work) == ["a", "b"] and not plan.preempted
    s = _two_running(3)                                     # no page free: the newcomer takes a slot
    s.add("c", 1, 4, 1.0)
    plan = s.schedule(1.0)
    assert "c" in {w.request_id for w in plan.work} and plan.dropped
    s = _two_running(101)                                   # four newcomers: congested
    for i in range(4):
        s.add(f"c{i}", 1, 4, 1.0 + i / 10)
    plan = s.schedule(2.0)
    assert {w.request_id for w in plan.work} == {"c0", "c1"} and set(plan.preempted) == {"a", "b"}
    s.check_invariants()

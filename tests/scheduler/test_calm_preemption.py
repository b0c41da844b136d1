"""Running jobs that keep their slots. MLFQ change 12: while the system is calm (fewer than max_batch / 8
jobs waiting and at least a quarter of the device pages free), running jobs keep their slots; a
higher-ranked newcomer takes the next free one. Each condition alone lifts it (controls), and tail-class
heads still go first. Change 13: a running job that has been in the system longer than the 95th
percentile of finished jobs' time in system keeps its slot while a quarter of the pages is free, even
when new jobs congest the queue (controls: younger than the threshold, too few pages free, before 16
jobs finished)."""
from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.mlfq import CALM_FREE_PAGES, MIN_SEEN_FOR_ORDER, SkipJoinMLFQ
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


def _finish(m, sojourns):
    for i, t in enumerate(sojourns):
        j = _job(f"done{i}", 0, State.RUNNING)
        j.last_run, j.generated, j.attained = t, 4, 0.01
        m.on_finish(j)


def test_the_threshold_is_the_95th_percentile_of_finished_jobs_time_in_system():
    m = SkipJoinMLFQ(COST, max_batch=32)
    _finish(m, [float(t) for t in range(1, MIN_SEEN_FOR_ORDER)])
    assert m.protect_after == float("inf")                  # before 16 finished: nobody is protected
    _finish(m, [16.0, 17.0, 18.0, 19.0, 20.0])              # 20 jobs: sorted[int(0.95 * 19)] = the 19th
    assert m.protect_after == 19.0


def test_an_old_running_job_keeps_its_slot_among_congesting_newcomers():
    m = SkipJoinMLFQ(COST, max_batch=32)
    _finish(m, [float(t) for t in range(1, 21)])
    old = _job("old", 3, State.RUNNING)

    def newcomers(now):                                      # four just arrived: congested, not calm
        return [_job(f"new{i}", 0, State.WAITING, arrival=now) for i in range(4)]

    new = newcomers(20.0)
    m.refresh([old] + new, 20.0, free_page_share=1.0)        # old is 20 s in the system, past 19
    assert not m.calm and m.protected == {"old"} and m.order(new + [old])[0].rid == "old"
    new = newcomers(18.5)
    m.refresh([old] + new, 18.5, free_page_share=1.0)        # control: 18.5 s in, under the threshold
    assert not m.protected and m.order(new + [old])[-1].rid == "old"
    new = newcomers(20.0)
    m.refresh([old] + new, 20.0, free_page_share=CALM_FREE_PAGES - 0.01)   # control: KV getting tight
    assert not m.protected and m.order(new + [old])[-1].rid == "old"
    head = _job("head", -1, State.WAITING)
    head.tail_from = 2
    m.refresh([old, head] + new, 20.0, free_page_share=1.0)  # tail-class heads still go first
    assert [j.rid for j in m.order(new + [old, head])][:2] == ["head", "old"]


def test_the_scheduler_does_not_preempt_a_protected_job():
    def two_running():
        s = Scheduler(SchedulerConfig(max_batch=32, max_tokens_per_step=2, max_prefill_chunk=64, page_size=4,
                                      num_device_pages=101, num_host_pages=0, policy="mlfq", cost_model=COST))
        for rid in ("a", "b"):
            s.add(rid, 1, 3, 0.0)
        plan = s.schedule(0.0)
        s.on_step_done(plan, 0.01)
        for rid in ("a", "b"):
            s.jobs[rid].queue = 3
        for i in range(4):                                   # four newcomers: congested, not calm
            s.add(f"c{i}", 1, 4, 1.0 + i / 10)
        return s

    s = two_running()
    s.policy.protect_after = 1.5                             # a and b are 2 s in the system at 2.0
    plan = s.schedule(2.0)
    assert {w.request_id for w in plan.work} == {"a", "b"} and not plan.preempted
    s.check_invariants()
    s = two_running()
    s.policy.protect_after = 5.0                             # control: the newcomers take both slots
    plan = s.schedule(2.0)
    assert {w.request_id for w in plan.work} == {"c0", "c1"} and set(plan.preempted) == {"a", "b"}

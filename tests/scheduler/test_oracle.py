"""Oracle SRPT against a brute-force search over every schedule (pure Python, no JAX).

Model where the optimum is computable: one batch slot, every iteration costs 1 s (cost model
``base=1``, nothing else), prompts prefill in one iteration, arrivals at whole seconds. A job with
output length L then needs exactly L iterations, and the brute force tries every choice of job per
iteration (memoised), minimising total JCT.
"""
import functools
import itertools

from hypothesis import given, settings, strategies as st

from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.scheduler import SchedulerConfig
from ferry.scheduler.simulator import simulate

UNIT = CostModel(base=1.0, per_prefill_token=0.0, per_decode_row=0.0, per_context_token=0.0, per_swap_page=0.0)


def _cfg(policy):
    return SchedulerConfig(max_batch=1, max_tokens_per_step=64, max_prefill_chunk=64, page_size=4,
                           num_device_pages=200, num_host_pages=200, policy=policy, cost_model=UNIT)


def brute_force_total_jct(jobs: list[tuple[int, int]]) -> float:
    """Minimum total JCT over all preemptive one-slot schedules; jobs are (arrival, iterations)."""
    arrivals = tuple(a for a, _ in jobs)

    @functools.lru_cache(maxsize=None)
    def best(t: int, left: tuple[int, ...]) -> float:
        if not any(left):
            return 0.0
        ready = [i for i, n in enumerate(left) if n and arrivals[i] <= t]
        if not ready:                                  # idle until the next arrival
            return best(min(arrivals[i] for i, n in enumerate(left) if n), left)
        out = float("inf")
        for i in ready:
            nxt = list(left)
            nxt[i] -= 1
            done = (t + 1 - arrivals[i]) if nxt[i] == 0 else 0.0
            out = min(out, done + best(t + 1, tuple(nxt)))
        return out

    return best(0, tuple(n for _, n in jobs))


def _total(policy, jobs):
    trace = [{"arrival": float(a), "prompt_len": 3, "output_len": n} for a, n in jobs]
    res, _ = simulate(trace, _cfg(policy))
    return sum(r.jct for r in res)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 5)), min_size=1, max_size=4))
def test_oracle_matches_brute_force_optimum(jobs):
    assert abs(_total("oracle", jobs) - brute_force_total_jct(jobs)) < 1e-6


def test_brute_force_beats_fcfs_and_mlfq_somewhere():
    """Positive control: the optimum is strictly below FCFS on a long-job-first case, so the oracle
    test above can fail; and the oracle's total equals it there."""
    jobs = [(0, 6), (1, 1), (1, 2)]
    opt = brute_force_total_jct(jobs)
    assert opt == (2 - 1) + (4 - 1) + (9 - 0)                 # run 1-token, 2-token, then the long one
    assert _total("fcfs", jobs) > opt + 1
    assert _total("oracle", jobs) == opt


def test_brute_force_is_exhaustive_on_permutations():
    """All jobs at t=0: the optimum is the best run-to-completion order (shortest first)."""
    lens = [4, 1, 3, 2]
    jobs = [(0, n) for n in lens]
    best_perm = min(sum(itertools.accumulate(p)) for p in itertools.permutations(lens))
    assert brute_force_total_jct(jobs) == best_perm == 1 + 3 + 6 + 10

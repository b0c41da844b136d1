"""The Gittins reference (scheduler/gittins_ref.py): its index table equals the definition, its order
follows the hazard of the length distribution, and it runs a simulation with exact page accounting."""
import numpy as np
import pytest

from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.gittins import token_index
from ferry.scheduler.gittins_ref import GittinsReference, index_table
from ferry.scheduler.request_state import Job
from ferry.scheduler.scheduler import SchedulerConfig
from ferry.scheduler.simulator import simulate

COST = CostModel(base=0.01, decode_base=0.008, per_prefill_token=1e-5, per_decode_row=4e-5, per_context_token=0.0,
                 per_swap_page=0.0)


def _definition(lengths, g, known=0.0):
    """max over b > g of P(g < L <= b) / (known P(L > g) + sum_{t=g}^{b-1} P(L > t)), by plain loops."""
    L = list(lengths)
    F = lambda t: sum(x > t for x in L) / len(L)          # noqa: E731
    best = -1.0
    for b in range(g + 1, max(L) + 1):
        best = max(best, (F(g) - F(b)) / (known * F(g) + sum(F(t) for t in range(g, b))))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_index_table_is_the_definition_on_fresh_samples(seed):
    rng = np.random.default_rng(seed + int.from_bytes(np.random.bytes(2), "little"))
    lengths = rng.integers(1, 40, size=int(rng.integers(3, 30))).tolist()
    F, G = index_table(lengths)
    for g in range(max(lengths) + 1):
        assert F[g] == pytest.approx(sum(x > g for x in lengths) / len(lengths))
        if F[g] > 0:
            assert G[g] == pytest.approx(_definition(lengths, g))
        else:
            assert G[g] == 0
    k = float(rng.uniform(0.5, 20))
    assert token_index(F, 0, known=k) == pytest.approx(_definition(lengths, 0, known=k))
    assert token_index(F, 0, known=k) < G[0] == pytest.approx(token_index(F, 0, known=0.0))   # known work lowers it


def _job(rid, generated, prompt=4, computed=None):
    j = Job(rid, prompt, 1000, 0.0)
    j.generated, j.num_computed = generated, prompt + generated if computed is None else computed
    return j


def _ranked(lengths, jobs):
    p = GittinsReference(COST, max_batch=4)
    for i, n in enumerate(lengths):
        p.on_add(Job(f"seen{i}", 4, n, 0.0), 0.0)
    return [j.rid for j in p.order(jobs)]


def test_order_follows_the_hazard_each_case_the_others_control():
    pair = [_job("younger", 70), _job("older", 500)]
    # Heavy tail (decreasing hazard): the longer a job has run, the longer it will run; the younger first.
    heavy = [min(4096, round(8 / (1 - (i + 0.5) / 400) ** (1 / 0.8))) for i in range(400)]   # Pareto 0.8 quantiles
    assert _ranked(heavy, pair) == ["younger", "older"]
    # Past the short mode of a bimodal mix with uniform long jobs (rising hazard): the older is nearer its end.
    bimodal = list(range(8, 64)) * 9 + list(range(256, 1024))
    assert _ranked(bimodal, pair) == ["older", "younger"]
    # Inside the short mode a job is likelier to end soon than any job already past it.
    assert _ranked(bimodal, [_job("long", 300), _job("short", 5)]) == ["short", "long"]


def test_a_prompt_to_prefill_ranks_below_the_same_job_ready_to_decode():
    lengths = [10] * 50 + [200] * 50
    prefilling = _job("prefilling", 0, prompt=2000, computed=0)
    ready = _job("ready", 0, prompt=4)
    assert _ranked(lengths, [prefilling, ready]) == ["ready", "prefilling"]
    assert _ranked(lengths, [_job("p", 0, prompt=2000, computed=1990), _job("q", 0, prompt=2000, computed=0)]) == \
        ["p", "q"]


def test_simulation_finishes_every_job_with_exact_pages():
    rng = np.random.default_rng()
    trace = [{"arrival": float(a), "prompt_len": int(p), "output_len": int(o)}
             for a, p, o in zip(np.cumsum(rng.exponential(0.02, 60)), rng.integers(4, 200, 60),
                                rng.integers(1, 120, 60))]
    # Host room for every swapped job, as in the sweep: with drops the reference can cycle (its docstring).
    cfg = SchedulerConfig(max_batch=4, max_tokens_per_step=68, max_prefill_chunk=64, page_size=8,
                          num_device_pages=48, num_host_pages=60 * 40, policy="gittins", cost_model=COST)
    res, stats = simulate(trace, cfg, check_every=1)       # page ownership checked every iteration
    assert stats["finished"] == 60 and stats["device_pages_used"] == 0 and stats["host_pages_used"] == 0
    assert all(r.arrival <= r.first_token <= r.finish for r in res)

"""The ragged step: decode rows and prefill chunks of several requests in one program.

Host packing (engine/step_inputs.py) is checked field by field; the engine runs a plan with
chunks and decode rows as one dispatch and produces the same tokens as each request alone.
"""
import numpy as np
import pytest

from ferry.engine.config import EngineConfig
from ferry.engine.llm_engine import LLMEngine
from ferry.engine.sampling_params import SamplingParams
from ferry.engine.step_inputs import StepRow, StepShape, fits, pack

S = 4


def test_pack_lays_out_decode_rows_then_chunks():
    rows = [StepRow(10, 1, [7, 8, 9], None, 3),                  # decode row: token read from slot 3
            StepRow(0, 5, [2, 4], [11, 12, 13, 14, 15], None),   # a chunk that samples nothing
            StepRow(6, 1, [5, 6], None, 1),
            StepRow(7, 20, [1, 3, 10, 11, 12, 13, 14], list(range(100, 120)), 2)]   # last chunk: samples
    shape = StepShape(tokens=64, context=32, max_batch=4)
    x, sampled = pack(shape, rows, S)
    lay = x.meta.layout
    assert sampled == [0, 2, 3]                                  # decode rows first, then the chunks
    assert x.from_slot[:2].tolist() == [3, 1] and (x.from_slot[2:] == -1).all()
    assert x.positions[:2].tolist() == [10, 6]
    assert x.tokens[2:7].tolist() == [11, 12, 13, 14, 15] and x.tokens[7:27].tolist() == list(range(100, 120))
    assert x.positions[7:27].tolist() == list(range(7, 27)) and (x.positions[27:] == -1).all()
    assert x.meta.slot_mapping[0] == 9 * S + 2                  # position 10: page 2 of [7, 8, 9], offset 2
    assert x.meta.slot_mapping[7] == 3 * S + 3                  # position 7: page 1 of the last row
    assert (x.meta.slot_mapping[27:] == -1).all()
    assert lay.single_token[:2].tolist() == [0, 1] and lay.single_lens[:2].tolist() == [11, 7]
    assert (lay.single_token[2:] == -1).all() and (lay.single_lens[2:] == 0).all()
    assert lay.q_block == 16
    assert lay.block_start[:3].tolist() == [2, 7, 23] and lay.block_len[:3].tolist() == [5, 16, 4]
    assert (lay.block_start[3:] == -1).all()
    assert lay.block_tables[1, :7].tolist() == [1, 3, 10, 11, 12, 13, 14]
    assert x.sample_token[:3].tolist() == [0, 1, 26] and x.sample_slot[:3].tolist() == [3, 1, 2]


def test_pack_refuses_rows_that_do_not_fit():
    shape = StepShape(tokens=16, context=32, max_batch=4)
    ok = [StepRow(0, 16, [1, 2, 3, 4], list(range(16)), 0)]
    assert fits(shape, ok)
    for bad in ([StepRow(0, 17, [1] * 5, list(range(17)), 0)],                       # too many tokens
                [StepRow(i, 1, [1] * 8, None, i) for i in range(5)],                 # too many rows
                [StepRow(30, 3, [1] * 9, [1, 2, 3], 0)],                             # past the context
                [StepRow(0, 2, [1], [1, 2], None) for _ in range(5)]):               # too many chunks
        assert not fits(shape, bad)
        with pytest.raises(ValueError, match="do not fit"):
            pack(shape, bad, S)


def _cfg(cache_dir, **kw):
    base = dict(model="random:tiny", max_batch=4, max_model_len=256, max_prefill_chunk=16,
                max_num_batched_tokens=64, num_pages=96, num_host_pages=16, strict_compile_guard=True,
                warmup_progress=False, compile_cache_dir=str(cache_dir), model_cache_dir=None, decode_steps=4)
    base.update(kw)
    return EngineConfig(**base)


def _params(i):
    if i % 2:
        return SamplingParams(temperature=0.8, top_k=50, seed=100 + i, max_tokens=12, ignore_eos=True)
    return SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _prompt(i, rng):
    return rng.integers(3, 500, 5 + 9 * i).tolist()


def test_mixed_plan_runs_as_one_dispatch_and_matches_requests_alone(tmp_path):
    rng = np.random.default_rng()
    prompts = [_prompt(i, rng) for i in range(4)]
    eng = LLMEngine(_cfg(tmp_path))
    eng.add_request("r0", prompts[0], _params(0))
    eng.step()                                                   # r0 prefilled, decoding from now on
    for i in range(1, 4):
        eng.add_request(f"r{i}", prompts[i], _params(i))
    out, mixed = {}, 0
    while eng.has_unfinished_requests():
        before = eng.stats_totals["ragged_steps"]
        for o in eng.step():
            if o.finished:
                out[o.request_id] = list(o.token_ids)
        plan = eng.last_plan
        if plan.prefill_items:
            assert eng.stats_totals["ragged_steps"] == before + 1           # the whole plan: one program
            mixed += len(plan.prefill_items) >= 2 and len(plan.decode_items) >= 1
        eng.scheduler.check_invariants()
    assert mixed >= 1                                                       # chunks of 2+ requests + decode rows
    s = eng.stats()
    assert s["device_pages_used"] == 0 and eng.guard.violations == 0 and not eng.slots.slot_of
    for i in range(4):                                                      # each alone, one at a time
        alone = LLMEngine(_cfg(tmp_path, warmup="lazy", strict_compile_guard=False))
        alone.add_request("a", prompts[i], _params(i))
        toks = None
        while alone.has_unfinished_requests():
            for o in alone.step():
                if o.finished:
                    toks = list(o.token_ids)
        assert toks == out[f"r{i}"], i

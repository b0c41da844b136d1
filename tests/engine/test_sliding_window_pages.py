"""A model whose every layer has a sliding window: the engine frees the pages that slide out of it
while a request runs, and the tokens still equal a naive full recompute with the same window."""
import dataclasses

import numpy as np

from ferry.engine.config import EngineConfig
from ferry.engine.llm_engine import LLMEngine
from ferry.engine.sampling_params import SamplingParams
from ferry.models.naive import naive_greedy
from ferry.models.random_weights import random_bundle


def test_window_pages_are_freed_and_tokens_match_naive(tmp_path):
    b = random_bundle("random:tiny", seed=3)
    cfg = dataclasses.replace(b.config, sliding_window=12, layer_types=("sliding_attention",) * b.config.num_layers,
                              architecture="mistral")
    b = dataclasses.replace(b, config=cfg)
    eng = LLMEngine(EngineConfig(model="random:tiny", max_batch=2, max_model_len=128, page_size=4,
                                 max_prefill_chunk=16, num_pages=40, warmup="lazy", warmup_progress=False,
                                 compile_cache_dir=str(tmp_path), model_cache_dir=None, decode_steps=4), bundle=b)
    assert eng.scheduler.cfg.window == 12
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 500, 37).tolist(), rng.integers(3, 500, 9).tolist()]
    for i, ids in enumerate(prompts):
        eng.add_request(str(i), ids, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    out, peak = {}, 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = list(o.token_ids)
        eng.scheduler.check_invariants()
        peak = max(peak, eng.stats()["device_pages_used"])
    s = eng.stats()
    assert s["window_pages_freed"] > 0 and s["device_pages_used"] == 0
    assert peak < sum(-(-(len(p) + 30) // 4) for p in prompts)        # fewer than the full contexts need
    for i, ids in enumerate(prompts):
        assert out[str(i)] == naive_greedy(cfg, b.params, ids, 30), i

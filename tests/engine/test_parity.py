"""Token-for-token parity of the paged engine with HF transformers and the naive forward."""
import jax.numpy as jnp
import numpy as np
import pytest

from ferry import SamplingParams
from ferry.models.attention import one_request_meta
from ferry.models.llama import Llama, logits
from ferry.models.naive import naive_greedy

RAW = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 5, 8, 13,",
    "Translate to French: I love reading books.\nFrench:",
]
CHAT = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
N_NEW = 32


@pytest.fixture(scope="module")
def prompts(llm):
    tok = llm.tokenizer
    return [tok.encode(p) for p in RAW] + [tok.encode(tok.apply_chat_template(m)) for m in CHAT]


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompts):
    import torch
    out = []
    with torch.inference_mode():
        for ids in prompts:
            g = hf_model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False,
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=2)
            out.append(g[0, len(ids):].tolist())
    return out


def test_greedy_tokens_match_hf(llm, prompts, hf_greedy):
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=N_NEW))
    for ids, out, ref in zip(prompts, outs, hf_greedy):
        # HF stops at EOS; we stop at EOS too (same stop token), so compare the common run.
        assert list(out.token_ids) == ref[:len(out.token_ids)], llm.tokenizer.decode(ids)
        assert len(out.token_ids) == len(ref)
    assert sum(len(o.token_ids) for o in outs) >= 8 * 16


def test_last_position_logits_match_hf(llm, hf_model, prompts):
    import torch
    eng = llm.engine
    cfg, params = eng.model_config, eng.params
    model = Llama(cfg, attn_impl="reference")
    S = eng.config.page_size
    for ids in prompts[:8]:
        n = len(ids)
        P = -(-n // S)
        kc = jnp.zeros((cfg.num_layers, cfg.num_kv_heads, P + 1, S, cfg.head_dim), jnp.float32)
        pages = np.arange(1, P + 1, dtype=np.int32)
        pos = np.arange(n, dtype=np.int32)
        meta = one_request_meta(pos, pages, S)
        h, _, _ = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(pos), kc, kc, meta)
        ours = np.asarray(logits(cfg, params, h[-1:]))[0]
        with torch.inference_mode():
            ref = hf_model(torch.tensor([ids])).logits[0, -1].numpy()
        rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        assert rel < 1e-4, rel


def test_paged_engine_equals_naive_recompute(llm, default_bundle):
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    ref = naive_greedy(default_bundle.config, default_bundle.params, ids, 12)
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    assert list(out.token_ids) == ref

"""The paged Flax model equals the naive full-recompute forward (random tiny model)."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from ferry.models.config import SHAPES
from ferry.models.attention import AttnMeta, one_request_meta
from ferry.kernels.ragged_attention import RaggedLayout
from ferry.models.llama import Llama, init_params, logits, runtime_params
from ferry.models.naive import naive_logits

S = 4   # page size


def _setup(cfg, seed):
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed)
    L, H, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    kc = jnp.full((L, H, 32, S, D), jnp.nan, jnp.float32)   # poisoned: unwritten slots must never be read
    kc = kc.at[:, :, 0].set(0.0)                             # null page is zeros
    return rng, params, kc, kc


@pytest.mark.parametrize("cfg", [SHAPES["tiny"], dataclasses.replace(SHAPES["tiny"], attention_bias=True,
                                                                     tie_word_embeddings=True, num_kv_heads=4),
                                 SHAPES["tiny-gemma"], SHAPES["tiny-moe"]], ids=lambda c: c.name)
def test_chunked_prefill_then_decode_matches_naive(cfg):
    rng, params, kc, vc = _setup(cfg, int(np.random.SeedSequence().entropy % 2**31))
    n_total, chunk = 19, 8
    ids = rng.integers(0, cfg.vocab_size, n_total)
    pages = rng.permutation(np.arange(1, 32))[:8].astype(np.int32)    # shuffled, never the null page
    ref = np.asarray(naive_logits(cfg, params, ids))
    params = runtime_params(params)
    pre = dec = Llama(cfg, attn_impl="reference")
    n_prompt = 13
    for start in range(0, n_prompt, chunk):                              # two chunks: 8 + 5 (padded to 8)
        n = min(chunk, n_prompt - start)
        tok = np.zeros(chunk, np.int32); tok[:n] = ids[start:start + n]
        pos = np.full(chunk, -1, np.int32); pos[:n] = np.arange(start, start + n)
        h, kc, vc = pre.apply({"params": params}, tok, pos, kc, vc, one_request_meta(pos, pages, S))
        got = np.asarray(logits(cfg, params, h[:n]))
        np.testing.assert_allclose(got, ref[start:start + n], rtol=1e-4, atol=1e-4)
    for t in range(n_prompt, n_total):                                    # decode rows with a padding row
        tok = np.array([ids[t], 0], np.int32)
        h, kc, vc = dec.apply({"params": params}, tok, np.array([t, -1], np.int32), kc, vc, AttnMeta(
            jnp.asarray([pages[t // S] * S + t % S, -1], jnp.int32), RaggedLayout.decode(
                jnp.asarray(np.stack([pages, np.zeros_like(pages)])), jnp.asarray([t + 1, 0], jnp.int32))))
        np.testing.assert_allclose(np.asarray(logits(cfg, params, h[:1]))[0], ref[t], rtol=1e-4, atol=1e-4)

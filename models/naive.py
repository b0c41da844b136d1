"""Naive full-recompute forward (no cache, dense causal attention).

The test oracle for the paged engine: ``naive_logits(cfg, params, ids)``
returns f32[T, V] logits for every position of one sequence, and
``naive_greedy`` generates by recomputing the whole sequence each token.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ferry.models.config import ModelConfig
from ferry.models.llama import apply_rope, rms_norm, rope_inv_freq


def _forward(cfg: ModelConfig, params, ids):
    """Storage-layout params (models/config.py), dense causal attention, no cache."""
    c, lp = cfg, params["layers"]
    T = ids.shape[0]
    pos = jnp.arange(T, dtype=jnp.int32)
    inv = jnp.asarray(rope_inv_freq(c))
    G = c.num_heads // c.num_kv_heads
    causal = jnp.tril(jnp.ones((T, T), bool))
    h = params["embed"][ids]
    for i in range(c.num_layers):
        x = rms_norm(h, lp["attn_norm"][i], c.rms_norm_eps)
        q, k, v = x @ lp["wq"][i], x @ lp["wk"][i], x @ lp["wv"][i]
        if c.attention_bias:
            q, k, v = q + lp["bq"][i], k + lp["bk"][i], v + lp["bv"][i]
        q = apply_rope(q.reshape(T, c.num_heads, c.head_dim), pos, inv)
        k = apply_rope(k.reshape(T, c.num_kv_heads, c.head_dim), pos, inv)
        v = v.reshape(T, c.num_kv_heads, c.head_dim)
        k, v = jnp.repeat(k, G, axis=1), jnp.repeat(v, G, axis=1)
        s = jnp.einsum("thd,shd->hts", q, k) / math.sqrt(c.head_dim)
        s = jnp.where(causal[None], s, -jnp.inf)
        o = jnp.einsum("hts,shd->thd", jax.nn.softmax(s, axis=-1), v).reshape(T, -1)
        h = h + o @ lp["wo"][i]
        x = rms_norm(h, lp["mlp_norm"][i], c.rms_norm_eps)
        h = h + (jax.nn.silu(x @ lp["w_gate"][i]) * (x @ lp["w_up"][i])) @ lp["w_down"][i]
    w = params["embed"].T if c.tie_word_embeddings else params["lm_head"]          # [D, V]
    return rms_norm(h, params["final_norm"], c.rms_norm_eps) @ w


def naive_logits(cfg: ModelConfig, params, ids) -> jax.Array:
    """f32[T, V] logits of every position of ``ids`` (i32[T])."""
    return jax.jit(_forward, static_argnums=0)(cfg, params, jnp.asarray(ids, jnp.int32))


def naive_greedy(cfg: ModelConfig, params, ids, max_new_tokens: int) -> list[int]:
    """Greedy continuation by full recompute (slow; a test oracle only)."""
    seq = list(ids)
    for _ in range(max_new_tokens):
        seq.append(int(jnp.argmax(naive_logits(cfg, params, seq)[-1])))
    return seq[len(ids):]

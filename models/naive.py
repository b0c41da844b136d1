"""Naive full-recompute forward (no cache, dense causal attention), for every family.

The test oracle for the paged engine: ``naive_logits(cfg, params, ids)``
returns f32[T, V] logits for every position of one sequence, and
``naive_greedy`` generates by recomputing the whole sequence each token.
Attention is written out densely here (window, soft-cap and scale as in HF); the
per-token math shared with the paged model comes from models/layers.py and models/moe.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ferry.models.config import ModelConfig
from ferry.models.layers import activation, apply_rope, attn_scale, embed_scale, rms_norm, rope_inv_freq, softcap
from ferry.models.moe import moe_mlp


def _forward(cfg: ModelConfig, params, ids):
    """Storage-layout params (models/config.py), dense causal attention, no cache."""
    c, lp = cfg, params["layers"]
    T = ids.shape[0]
    pos = jnp.arange(T, dtype=jnp.int32)
    G = c.num_heads // c.num_kv_heads
    causal = pos[None, :] <= pos[:, None]                       # [query, key]
    h = params["embed"][ids] * embed_scale(c, params["embed"].dtype)
    for i in range(c.num_layers):
        inv = jnp.asarray(rope_inv_freq(c, i))
        x = rms_norm(h, lp["attn_norm"][i], c.rms_norm_eps)
        q, k, v = x @ lp["wq"][i], x @ lp["wk"][i], x @ lp["wv"][i]
        if c.attention_bias:
            q, k, v = q + lp["bq"][i], k + lp["bk"][i], v + lp["bv"][i]
        q, k = q.reshape(T, c.num_heads, c.head_dim), k.reshape(T, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = rms_norm(q, lp["q_norm"][i], c.rms_norm_eps), rms_norm(k, lp["k_norm"][i], c.rms_norm_eps)
        q, k = apply_rope(q, pos, inv), apply_rope(k, pos, inv)
        v = v.reshape(T, c.num_kv_heads, c.head_dim)
        k, v = jnp.repeat(k, G, axis=1), jnp.repeat(v, G, axis=1)
        s = softcap(jnp.einsum("thd,shd->hts", q, k) * attn_scale(c), c.attn_logit_softcap)
        mask = causal
        if c.window(i) is not None:
            mask = mask & (pos[None, :] > pos[:, None] - c.window(i))
        s = jnp.where(mask[None], s, -jnp.inf)
        a = jnp.einsum("hts,shd->thd", jax.nn.softmax(s, axis=-1), v).reshape(T, -1) @ lp["wo"][i]
        if c.sandwich_norm:
            a = rms_norm(a, lp["post_attn_norm"][i], c.rms_norm_eps)
        h = h + a
        x = rms_norm(h, lp["mlp_norm"][i], c.rms_norm_eps)
        if c.num_experts:
            m = moe_mlp(c, x, lp["router"][i].T, lp["we_gate"][i], lp["we_up"][i], lp["we_down"][i])
        else:
            m = (activation(c, x @ lp["w_gate"][i]) * (x @ lp["w_up"][i])) @ lp["w_down"][i]
        if c.sandwich_norm:
            m = rms_norm(m, lp["post_mlp_norm"][i], c.rms_norm_eps)
        h = h + m
    w = params["embed"].T if c.tie_word_embeddings else params["lm_head"]          # [D, V]
    return softcap(rms_norm(h, params["final_norm"], c.rms_norm_eps) @ w, c.final_logit_softcap)


def naive_logits(cfg: ModelConfig, params, ids) -> jax.Array:
    """f32[T, V] logits of every position of ``ids`` (i32[T])."""
    return jax.jit(_forward, static_argnums=0)(cfg, params, jnp.asarray(ids, jnp.int32))


def naive_greedy(cfg: ModelConfig, params, ids, max_new_tokens: int) -> list[int]:
    """Greedy continuation by full recompute (slow; a test oracle only)."""
    seq = list(ids)
    for _ in range(max_new_tokens):
        seq.append(int(jnp.argmax(naive_logits(cfg, params, seq)[-1])))
    return seq[len(ids):]

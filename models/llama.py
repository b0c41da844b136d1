"""Llama-family decoder in Flax (linen) over a paged KV cache.

One module serves prefill and decode; layers are stacked with ``nn.scan`` so
XLA compiles one layer body (short compiles, one program per bucket). The KV
cache rides in the scan carry and every layer writes its new K/V in place
(the engine donates the cache buffers).

Shapes (N = tokens in this call):
  tokens, positions: i32[N]           positions: -1 marks a padding token
  k_cache, v_cache:  f[L, Hkv, P, S, Dh]
  AttnMeta.slot_mapping: i32[N]       page * S + offset; -1 = do not write
  decode:  AttnMeta.block_tables i32[N, P_max], seq_lens i32[N] (one token per row)
  prefill: AttnMeta.block_tables i32[1, P_max] (one request), seq_lens unused
Returns hidden states f[N, D] after the final norm, and the updated caches.
Call ``logits(params, hidden)`` for the rows you need.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kernels.paged_attention import paged_attention
from kernels.prefill_attention import prefill_attention, write_kv
from models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttnMeta:
    slot_mapping: jax.Array      # i32[N]
    block_tables: jax.Array      # i32[B, P_max]  (B = N for decode, 1 for prefill)
    seq_lens: jax.Array          # i32[B]


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """f32[Dh/2] inverse frequencies, with Llama-3 scaling when configured."""
    dh = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.int64).astype(np.float32) / dh))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wl, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    mid = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
    return np.where(is_mid, mid, scaled).astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """x: f[N, H, Dh] (rotate_half layout), positions: i32[N]."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]     # [N, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb)[:, None, :], jnp.sin(emb)[:, None, :]
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rot.astype(jnp.float32) * sin).astype(x.dtype)


def rms_norm(x, weight, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def _zeros(_key, shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype) * 0.02


class DecoderLayer(nn.Module):
    """One pre-norm Llama block; scanned over layers (carry = h, k_cache, v_cache)."""

    cfg: ModelConfig
    mode: str                      # "prefill" | "decode"
    dtype: Any = jnp.float32
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, carry, layer, positions, meta: AttnMeta, inv_freq):
        h, k_cache, v_cache = carry
        c, dt = self.cfg, self.dtype
        D, Dh, Hq, Hkv, F = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size
        ones = lambda _k, s, d=jnp.float32: jnp.ones(s, d)   # noqa: E731
        p = lambda name, shape, init=_normal: self.param(name, init, shape, dt)  # noqa: E731
        N = h.shape[0]

        x = rms_norm(h, p("attn_norm", (D,), ones), c.rms_norm_eps)
        q, k, v = x @ p("wq", (D, Hq * Dh)), x @ p("wk", (D, Hkv * Dh)), x @ p("wv", (D, Hkv * Dh))
        if c.attention_bias:
            q = q + p("bq", (Hq * Dh,), _zeros)
            k = k + p("bk", (Hkv * Dh,), _zeros)
            v = v + p("bv", (Hkv * Dh,), _zeros)
        q = apply_rope(q.reshape(N, Hq, Dh), positions, inv_freq)
        k = apply_rope(k.reshape(N, Hkv, Dh), positions, inv_freq)
        v = v.reshape(N, Hkv, Dh)
        k_cache, v_cache = write_kv(k_cache, v_cache, layer, k, v, meta.slot_mapping)
        scale = 1.0 / math.sqrt(Dh)
        if self.mode == "decode":
            o = paged_attention(q, k_cache, v_cache, layer, meta.block_tables, meta.seq_lens,
                                scale=scale, impl=self.attn_impl)
        else:
            o = prefill_attention(q, k_cache, v_cache, layer, meta.block_tables[0], positions,
                                  scale=scale, impl=self.attn_impl)
        h = h + o.reshape(N, Hq * Dh) @ p("wo", (Hq * Dh, D))

        x = rms_norm(h, p("mlp_norm", (D,), ones), c.rms_norm_eps)
        g, u = x @ p("w_gate", (D, F)), x @ p("w_up", (D, F))
        h = h + (jax.nn.silu(g) * u) @ p("w_down", (F, D))
        return (h, k_cache, v_cache), None


class Llama(nn.Module):
    """Embedding -> L scanned decoder layers -> final norm. See module docstring."""

    cfg: ModelConfig
    mode: str = "decode"
    dtype: Any = jnp.float32
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, tokens, positions, k_cache, v_cache, meta: AttnMeta):
        c = self.cfg
        embed = self.param("embed", _normal, (c.vocab_size, c.hidden_size), self.dtype)
        h = embed[tokens]
        inv_freq = jnp.asarray(rope_inv_freq(c))
        layers = nn.scan(
            DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers)
        (h, k_cache, v_cache), _ = layers(c, self.mode, self.dtype, self.attn_impl, name="layers")(
            (h, k_cache, v_cache), jnp.arange(c.num_layers, dtype=jnp.int32), positions, meta, inv_freq)
        final = self.param("final_norm", lambda _k, s, d: jnp.ones(s, d), (c.hidden_size,), self.dtype)
        if not c.tie_word_embeddings:
            self.param("lm_head", _normal, (c.hidden_size, c.vocab_size), self.dtype)
        return rms_norm(h, final, c.rms_norm_eps), k_cache, v_cache


def logits(cfg: ModelConfig, params, hidden):
    """f32[N, V] logits for hidden f[N, D]; ``params`` is the plain params dict."""
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.dot(hidden, w, preferred_element_type=jnp.float32).astype(jnp.float32)


def init_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32):
    """Random params of the right shapes (benchmarks with real shapes, tests)."""
    model = Llama(cfg, mode="decode", dtype=dtype, attn_impl="reference")
    cache = jnp.zeros((cfg.num_layers, cfg.num_kv_heads, 2, 4, cfg.head_dim), dtype)
    meta = AttnMeta(jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32))
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1,), jnp.int32),
                                    jnp.zeros((1,), jnp.int32), cache, cache, meta)
    return variables["params"]

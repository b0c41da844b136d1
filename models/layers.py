"""Layers shared by every family: RMSNorm, RoPE, matmul, gated MLP.

Pure functions over arrays (no Flax state), used by the paged model (models/llama.py)
and the naive reference (models/naive.py), so both compute each family the same way.
Weights passed to ``matmul`` are ``[out, in]`` (runtime layout); ``x @ w`` callers
with storage-layout ``[in, out]`` weights use ``@`` directly.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ferry.models.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, layer: int | None = None) -> np.ndarray:
    """f32[Dh/2] inverse frequencies of ``layer`` (its own base on Gemma 3's sliding layers),
    with Llama-3 or linear scaling where configured (global layers only on Gemma 3)."""
    dh = cfg.head_dim
    local = layer is not None and cfg.rope_local_theta is not None and cfg.window(layer) is not None
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, dh, 2, dtype=np.int64).astype(np.float32) / dh))
    rs = None if local else cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    if rs.rope_type == "linear":
        return (inv / rs.factor).astype(np.float32)
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
    """RMSNorm over the last axis; ``weight`` is the applied multiplier (Gemma's 1 + w already added)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def matmul(x, w):
    """x f[..., in] @ w f[out, in]^T with f32 accumulation, result in x's dtype."""
    y = jax.lax.dot_general(x.astype(w.dtype), w, (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def activation(cfg: ModelConfig, g):
    """The gate activation: SiLU (SwiGLU) or tanh-approximated GeLU (Gemma's GeGLU)."""
    return jax.nn.gelu(g, approximate=True) if cfg.hidden_act == "gelu_tanh" else jax.nn.silu(g)


def softcap(x, cap: float | None):
    """cap * tanh(x / cap) (identity when cap is None)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def attn_scale(cfg: ModelConfig) -> float:
    """Multiplier of q.k: ``query_pre_attn_scalar ** -0.5`` on Gemma, else ``head_dim ** -0.5``."""
    return cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(cfg.head_dim)


def embed_scale(cfg: ModelConfig, dtype):
    """Gemma multiplies embeddings by sqrt(D) rounded to the weights' dtype (as HF does); else 1."""
    return jnp.asarray(math.sqrt(cfg.hidden_size) if cfg.scale_embeddings else 1.0, dtype)

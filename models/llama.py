"""The decoder of every family (Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3, Mixtral, Qwen3-MoE)
in Flax (linen) over a paged KV cache; the config's features (models/config.py) select
q/k norms, sliding windows, soft-caps, sandwich norms, GeLU, scaled embeddings and routed
experts (models/moe.py). Shared math lives in models/layers.py.

One module serves every step: the rows of a step (decode rows and prefill chunks)
are described by ``AttnMeta`` (models/attention.py). Layers are unrolled in Python over
per-layer parameters (``runtime_params``): on XLA:CPU a ``scan`` over stacked
weights copies every layer's weights out of the stack each step (measured 1.3x
slower decode at batch 16), and static layer indices let each layer update
the donated KV cache in place.

Runtime parameter tree (``runtime_params(storage_params)``), weights ``[out, in]``
so a matmul reads contiguous rows (measured 1.2-1.4x faster bf16 decode on CPU):
  embed f[V, D]; final_norm f[D]; lm_head f[V, D] (absent if tied)
  layer_{i}: attn_norm, mlp_norm f[D]; wq f[Hq*Dh, D]; wk, wv f[Hkv*Dh, D];
             wo f[D, Hq*Dh]; bq, bk, bv (if attention_bias); w_gate, w_up f[F, D]; w_down f[D, F]
             q_norm, k_norm f[Dh] (qk_norm); post_attn_norm, post_mlp_norm f[D] (sandwich_norm)
             router f[E, D]; we_gate, we_up f[E, D, F]; we_down f[E, F, D] (experts stay [in, out])
Storage / checkpoint layout (stacked on L, ``[in, out]``) is documented in models/config.py.

Shapes (N = tokens in this call):
  tokens, positions: i32[N]           positions: -1 marks a padding token
  k_cache, v_cache:  f[L, Hkv, P, S, Dh]
  meta: AttnMeta                      slot mapping + ragged row layout (models/attention.py)
Returns hidden states f[N, D] after the final norm, and the updated caches.
Call ``logits(cfg, params, hidden)`` for the rows you need (final soft-cap included).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ferry.models.attention import AttnMeta, attend, op_impl  # noqa: F401  (re-exported)
from ferry.models.config import ModelConfig
from ferry.models.layers import (activation, apply_rope, attn_scale, embed_scale, matmul,  # noqa: F401
                                 rms_norm, rope_inv_freq, softcap)
from ferry.models.moe import moe_mlp


def _zeros(_key, shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


def _ones(_key, shape, dtype=jnp.float32):
    return jnp.ones(shape, dtype)


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype) * 0.02


class DecoderLayer(nn.Module):
    """One pre-norm block at a static layer index; the config's features pick the variant."""

    cfg: ModelConfig
    layer: int
    dtype: Any = jnp.float32
    attn_impl: Any = "auto"            # a string, or the engine's KernelChoice (see op_impl)
    mesh: Any = None               # jax.sharding.Mesh for tensor parallel (attention runs per shard)

    @nn.compact
    def __call__(self, h, k_cache, v_cache, positions, meta: AttnMeta):
        c, dt = self.cfg, self.dtype
        D, Dh, Hq, Hkv, F = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size
        p = lambda name, shape, init=_normal: self.param(name, init, shape, dt)  # noqa: E731
        N = h.shape[0]

        x = rms_norm(h, p("attn_norm", (D,), _ones), c.rms_norm_eps)
        q, k, v = matmul(x, p("wq", (Hq * Dh, D))), matmul(x, p("wk", (Hkv * Dh, D))), matmul(x, p("wv", (Hkv * Dh, D)))
        if c.attention_bias:
            q = q + p("bq", (Hq * Dh,), _zeros)
            k = k + p("bk", (Hkv * Dh,), _zeros)
            v = v + p("bv", (Hkv * Dh,), _zeros)
        q, k, v = q.reshape(N, Hq, Dh), k.reshape(N, Hkv, Dh), v.reshape(N, Hkv, Dh)
        if c.qk_norm:                                                  # per head, before RoPE
            q = rms_norm(q, p("q_norm", (Dh,), _ones), c.rms_norm_eps)
            k = rms_norm(k, p("k_norm", (Dh,), _ones), c.rms_norm_eps)
        inv_freq = jnp.asarray(rope_inv_freq(c, self.layer))
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        o, k_cache, v_cache = attend(q, k, v, k_cache, v_cache, self.layer, meta, positions, scale=attn_scale(c),
                                     impl=self.attn_impl, mesh=self.mesh, soft_cap=c.attn_logit_softcap,
                                     window=c.window(self.layer))
        a = matmul(o.reshape(N, Hq * Dh), p("wo", (D, Hq * Dh)))
        if c.sandwich_norm:
            a = rms_norm(a, p("post_attn_norm", (D,), _ones), c.rms_norm_eps)
        h = h + a

        x = rms_norm(h, p("mlp_norm", (D,), _ones), c.rms_norm_eps)
        if c.num_experts:
            E = c.num_experts
            m = moe_mlp(c, x, p("router", (E, D)), p("we_gate", (E, D, F)), p("we_up", (E, D, F)),
                        p("we_down", (E, F, D)), mesh=self.mesh)
        else:
            g, u = matmul(x, p("w_gate", (F, D))), matmul(x, p("w_up", (F, D)))
            m = matmul(activation(c, g) * u, p("w_down", (D, F)))
        if c.sandwich_norm:
            m = rms_norm(m, p("post_mlp_norm", (D,), _ones), c.rms_norm_eps)
        return h + m, k_cache, v_cache


class Llama(nn.Module):
    """Embedding -> L decoder layers -> final norm, for every family (see module docstring)."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    attn_impl: Any = "auto"            # a string, or the engine's KernelChoice (see op_impl)
    mesh: Any = None

    @nn.compact
    def __call__(self, tokens, positions, k_cache, v_cache, meta: AttnMeta):
        c = self.cfg
        embed = self.param("embed", _normal, (c.vocab_size, c.hidden_size), self.dtype)
        h = embed[tokens] * embed_scale(c, embed.dtype)
        for i in range(c.num_layers):
            h, k_cache, v_cache = DecoderLayer(c, i, self.dtype, self.attn_impl, self.mesh,
                                               name=f"layer_{i}")(h, k_cache, v_cache, positions, meta)
        final = self.param("final_norm", _ones, (c.hidden_size,), self.dtype)
        if not c.tie_word_embeddings:
            self.param("lm_head", _normal, (c.vocab_size, c.hidden_size), self.dtype)
        return rms_norm(h, final, c.rms_norm_eps), k_cache, v_cache


def logits(cfg: ModelConfig, params, hidden):
    """f32[N, V] logits for hidden f[N, D]; ``params`` is the runtime params dict."""
    w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]          # [V, D]
    lg = jax.lax.dot_general(hidden.astype(w.dtype), w, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return softcap(lg, cfg.final_logit_softcap)


def runtime_params(params: dict) -> dict:
    """Storage layout (models/config.py: stacked on L, ``[in, out]``) -> this module's tree.

    Works on numpy (host) arrays, or on device arrays (then it stays on the device: random
    weights drawn there); every weight becomes its own contiguous array. Stacked matrices
    f[L, in, out] are transposed to [out, in]; expert stacks f[L, E, in, out] are not.
    """
    lay = params["layers"]
    on_device = isinstance(next(iter(lay.values())), jax.Array)
    xp = jnp if on_device else np
    own = (lambda a: jnp.array(a, copy=True)) if on_device else np.ascontiguousarray
    L = next(iter(lay.values())).shape[0]
    out = {k: xp.asarray(v) for k, v in params.items() if k != "layers"}
    if "lm_head" in out:
        out["lm_head"] = own(out["lm_head"].T)
    for i in range(L):
        out[f"layer_{i}"] = {name: own(a[i].T if np.ndim(a) == 3 else a[i]) for name, a in lay.items()}
    return out


def init_params(cfg: ModelConfig, seed: int = 0, dtype=np.float32) -> dict:
    """Random params in the storage layout (use ``runtime_params`` before ``Llama.apply``)."""
    from ferry.models.random_weights import random_params
    return random_params(cfg, seed, dtype)

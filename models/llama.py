"""Llama-family decoder in Flax (linen) over a paged KV cache.

One module serves prefill and decode. Layers are unrolled in Python over
per-layer parameters (``runtime_params``): on XLA:CPU a ``scan`` over stacked
weights copies every layer's weights out of the stack each step (measured 1.3x
slower decode at batch 16), and static layer indices let each layer update
the donated KV cache in place.

Runtime parameter tree (``runtime_params(storage_params)``), weights ``[out, in]``
so a matmul reads contiguous rows (measured 1.2-1.4x faster bf16 decode on CPU):
  embed f[V, D]; final_norm f[D]; lm_head f[V, D] (absent if tied)
  layer_{i}: attn_norm, mlp_norm f[D]; wq f[Hq*Dh, D]; wk, wv f[Hkv*Dh, D];
             wo f[D, Hq*Dh]; bq, bk, bv (if attention_bias); w_gate, w_up f[F, D]; w_down f[D, F]
Storage / checkpoint layout (stacked on L, ``[in, out]``) is documented in models/config.py.

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
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ferry.kernels.paged_attention import paged_attention
from ferry.kernels.prefill_attention import prefill_attention, write_kv
from ferry.models.config import ModelConfig


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


def op_impl(impl, op: str) -> str:
    """``impl``: one string for every op ("auto" | "reference" | "pallas"), or the engine's
    ``KernelChoice`` (kernels/selection.py), resolved once per engine, per op."""
    return impl if isinstance(impl, str) else impl.impl(op)


def _attend_local(q, k, v, k_cache, v_cache, meta: AttnMeta, positions, *, layer, mode, scale, impl):
    k_cache, v_cache = write_kv(k_cache, v_cache, layer, k, v, meta.slot_mapping, impl=op_impl(impl, "kv_write"))
    if mode == "decode":
        o = paged_attention(q, k_cache, v_cache, layer, meta.block_tables, meta.seq_lens, scale=scale,
                            impl=op_impl(impl, "paged_attention"))
    else:
        o = prefill_attention(q, k_cache, v_cache, layer, meta.block_tables[0], positions, scale=scale,
                              impl=op_impl(impl, "prefill_attention"))
    return o, k_cache, v_cache


def attend(q, k, v, k_cache, v_cache, layer: int, meta: AttnMeta, positions, *, mode, scale, impl, mesh=None):
    """Write this step's K/V into pages, then paged attention (decode) or chunk attention (prefill).

    q: f[N, Hq, Dh]; k, v: f[N, Hkv, Dh]. With a tensor-parallel ``mesh`` the
    whole thing runs per shard under ``shard_map``: each device writes and
    reads only its own KV heads' pages, so kernels never see a sharded axis.
    """
    fn = functools.partial(_attend_local, layer=layer, mode=mode, scale=scale, impl=impl)
    if mesh is None or mesh.size == 1:
        return fn(q, k, v, k_cache, v_cache, meta, positions)
    heads, cache, rep = P(None, "tp", None), P(None, "tp", None, None, None), P()
    meta_spec = AttnMeta(rep, rep, rep)
    return jax.shard_map(fn, mesh=mesh, in_specs=(heads, heads, heads, cache, cache, meta_spec, rep),
                         out_specs=(heads, cache, cache), check_vma=False)(
        q, k, v, k_cache, v_cache, meta, positions)


def matmul(x, w):
    """x f[..., in] @ w f[out, in]^T with f32 accumulation, result in x's dtype."""
    y = jax.lax.dot_general(x.astype(w.dtype), w, (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


class DecoderLayer(nn.Module):
    """One pre-norm Llama block at a static layer index."""

    cfg: ModelConfig
    layer: int
    mode: str                      # "prefill" | "decode"
    dtype: Any = jnp.float32
    attn_impl: Any = "auto"            # a string, or the engine's KernelChoice (see op_impl)
    mesh: Any = None               # jax.sharding.Mesh for tensor parallel (attention runs per shard)

    @nn.compact
    def __call__(self, h, k_cache, v_cache, positions, meta: AttnMeta, inv_freq):
        c, dt = self.cfg, self.dtype
        D, Dh, Hq, Hkv, F = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size
        ones = lambda _k, s, d=jnp.float32: jnp.ones(s, d)   # noqa: E731
        p = lambda name, shape, init=_normal: self.param(name, init, shape, dt)  # noqa: E731
        N = h.shape[0]

        x = rms_norm(h, p("attn_norm", (D,), ones), c.rms_norm_eps)
        q, k, v = matmul(x, p("wq", (Hq * Dh, D))), matmul(x, p("wk", (Hkv * Dh, D))), matmul(x, p("wv", (Hkv * Dh, D)))
        if c.attention_bias:
            q = q + p("bq", (Hq * Dh,), _zeros)
            k = k + p("bk", (Hkv * Dh,), _zeros)
            v = v + p("bv", (Hkv * Dh,), _zeros)
        q = apply_rope(q.reshape(N, Hq, Dh), positions, inv_freq)
        k = apply_rope(k.reshape(N, Hkv, Dh), positions, inv_freq)
        v = v.reshape(N, Hkv, Dh)
        o, k_cache, v_cache = attend(q, k, v, k_cache, v_cache, self.layer, meta, positions, mode=self.mode,
                                     scale=1.0 / math.sqrt(Dh), impl=self.attn_impl, mesh=self.mesh)
        h = h + matmul(o.reshape(N, Hq * Dh), p("wo", (D, Hq * Dh)))

        x = rms_norm(h, p("mlp_norm", (D,), ones), c.rms_norm_eps)
        g, u = matmul(x, p("w_gate", (F, D))), matmul(x, p("w_up", (F, D)))
        h = h + matmul(jax.nn.silu(g) * u, p("w_down", (D, F)))
        return h, k_cache, v_cache


class Llama(nn.Module):
    """Embedding -> L decoder layers -> final norm. See module docstring."""

    cfg: ModelConfig
    mode: str = "decode"
    dtype: Any = jnp.float32
    attn_impl: Any = "auto"            # a string, or the engine's KernelChoice (see op_impl)
    mesh: Any = None

    @nn.compact
    def __call__(self, tokens, positions, k_cache, v_cache, meta: AttnMeta):
        c = self.cfg
        embed = self.param("embed", _normal, (c.vocab_size, c.hidden_size), self.dtype)
        h = embed[tokens]
        inv_freq = jnp.asarray(rope_inv_freq(c))
        for i in range(c.num_layers):
            h, k_cache, v_cache = DecoderLayer(c, i, self.mode, self.dtype, self.attn_impl, self.mesh,
                                               name=f"layer_{i}")(h, k_cache, v_cache, positions, meta, inv_freq)
        final = self.param("final_norm", lambda _k, s, d: jnp.ones(s, d), (c.hidden_size,), self.dtype)
        if not c.tie_word_embeddings:
            self.param("lm_head", _normal, (c.vocab_size, c.hidden_size), self.dtype)
        return rms_norm(h, final, c.rms_norm_eps), k_cache, v_cache


def logits(cfg: ModelConfig, params, hidden):
    """f32[N, V] logits for hidden f[N, D]; ``params`` is the runtime params dict."""
    w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]          # [V, D]
    return jax.lax.dot_general(hidden.astype(w.dtype), w, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def runtime_params(params: dict) -> dict:
    """Storage layout (models/config.py: stacked on L, ``[in, out]``) -> this module's tree.

    Works on numpy (host) arrays; every weight becomes its own contiguous array.
    """
    lay = params["layers"]
    L = next(iter(lay.values())).shape[0]
    out = {k: np.asarray(v) for k, v in params.items() if k != "layers"}
    if "lm_head" in out:
        out["lm_head"] = np.ascontiguousarray(out["lm_head"].T)
    for i in range(L):
        out[f"layer_{i}"] = {name: np.ascontiguousarray(np.asarray(a[i]).T if np.ndim(a) == 3 else a[i])
                             for name, a in lay.items()}
    return out


def init_params(cfg: ModelConfig, seed: int = 0, dtype=np.float32) -> dict:
    """Random params in the storage layout (use ``runtime_params`` before ``Llama.apply``)."""
    from ferry.models.random_weights import random_params
    return random_params(cfg, seed, dtype)

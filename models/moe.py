"""Routed experts (Mixtral, Qwen3-MoE): top-k routing and a grouped matmul.

Routing (both families, as HF defines it): ``p = softmax(x @ router)`` in f32, keep the
top-k experts per token, renormalise their weights to sum to 1 when ``norm_topk_prob``
(always for Mixtral, a config flag for Qwen3-MoE). The N*k (token, expert) pairs are
sorted by expert and each expert's rows go through its SwiGLU MLP with
``jax.lax.ragged_dot`` (one grouped matmul per projection, no per-expert loop), then are
weighted and scattered back to their tokens.

Shapes (runtime layout, experts keep ``[E, in, out]`` because ragged_dot takes ``rhs[G, K, N]``):
  x: f[N, D]  router: f[E, D]  we_gate, we_up: f[E, D, F]  we_down: f[E, F, D]
Tensor parallel: with a mesh whose "tp" size divides E, experts are sharded over "tp"
(engine/sharding.py ``param_specs``); each device runs its own experts on every token
under ``shard_map`` and one psum adds the partial outputs. Otherwise experts are replicated.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ferry.models.config import ModelConfig
from ferry.models.layers import activation


def route(x, router, k: int, renorm: bool):
    """x f[N, D], router f[E, D] -> (weights f32[N, k], experts i32[N, k]), best expert first."""
    logits = jax.lax.dot_general(x.astype(router.dtype), router, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    w, e = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
    if renorm:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return w, e.astype(jnp.int32)


def _experts(x, w, e, wg, wu, wd, *, cfg: ModelConfig, axis: str | None):
    """Sum over each token's chosen experts held here (experts [off, off + E_local))."""
    N, D = x.shape
    El, k = wg.shape[0], e.shape[1]
    off = jax.lax.axis_index(axis) * El if axis else 0
    le = e.reshape(-1) - off                                    # [N*k] local expert id
    here = (le >= 0) & (le < El)
    key = jnp.where(here, le, El)                               # pairs of other devices sort last
    order = jnp.argsort(key, stable=True)
    tok = order // k                                            # [N*k] token of each sorted pair
    sizes = jnp.bincount(key, length=El + 1)[:El].astype(jnp.int32)
    xs = x[tok].astype(wg.dtype)
    dot = functools.partial(jax.lax.ragged_dot, group_sizes=sizes, preferred_element_type=jnp.float32)
    g, u = dot(xs, wg).astype(x.dtype), dot(xs, wu).astype(x.dtype)
    y = dot((activation(cfg, g) * u).astype(wd.dtype), wd).astype(x.dtype)   # rows of other devices: 0
    wt = jnp.where(here, w.reshape(-1), 0.0)[order].astype(x.dtype)
    out = jnp.zeros((N, D), jnp.float32).at[tok].add((y * wt[:, None]).astype(jnp.float32))
    if axis:
        out = jax.lax.psum(out, axis)
    return out.astype(x.dtype)


def moe_mlp(cfg: ModelConfig, x, router, wg, wu, wd, mesh=None):
    """The MoE block: x f[N, D] -> f[N, D]."""
    w, e = route(x, router, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    tp = 1 if mesh is None else mesh.shape.get("tp", 1)
    if tp == 1 or cfg.num_experts % tp:
        return _experts(x, w, e, wg, wu, wd, cfg=cfg, axis=None)
    fn = functools.partial(_experts, cfg=cfg, axis="tp")
    rep, ex = P(), P("tp", None, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(rep, rep, rep, ex, ex, ex), out_specs=rep, check_vma=False)(
        x, w, e, wg, wu, wd)

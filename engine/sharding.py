"""Tensor parallelism: a 1-D ``Mesh(("tp",))``, head re-layout, and NamedShardings.

Layout of the runtime params (per layer, ``[out, in]``; Megatron-style: one
all-reduce after attention and one after the MLP):

    wq/wk/wv  f[H*Dh, D]      P("tp", None)         heads split
    bq/bk/bv  f[H*Dh]         P("tp")
    wo        f[D, Hq*Dh]     P(None, "tp")         row-parallel (psum)
    w_gate/up f[F, D]         P("tp", None)         hidden split
    w_down    f[D, F]         P(None, "tp")         row-parallel (psum)
    lm_head   f[V, D]         P("tp", None)         vocab split (logits all-gathered)
    we_*      f[E, in, out]   P("tp", None, None)   experts split (models/moe.py: each device runs
                                                    its experts on every token, one psum)
    router, q_norm/k_norm, post norms               replicated
    embed     f[V, D]         replicated            (a row gather per token is cheap;
                                                    the tied-output matmul then needs no
                                                    collective of its own)
    norms                     replicated
    KV pages  f[L, Hkv, P, S, Dh]  P(None, "tp")    each device holds its KV heads' pages

Heads that do not divide the mesh: ``head_layout`` builds an equivalent model
whose KV-head count is a multiple of ``tp``, by replicating KV heads (each copy
serves a slice of its query group) and/or adding dummy heads whose q/k/v
weights and ``wo`` rows are zero. A dummy query head's output is multiplied by
zero rows of ``wo``, so the padded model computes exactly the same function.
SmolLM2 (9 q / 3 kv heads) on 2 devices becomes 12 q / 4 kv heads (one dummy
group); on 4 devices also 12 / 4; on 3 devices it is unchanged.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ferry.models.config import ModelConfig

AXIS = "tp"
KV_SPEC = P(None, AXIS, None, None, None)      # k/v cache f[L, Hkv, P, S, Dh]


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Which original head each head of the (possibly padded) model is; -1 = dummy."""

    kv_src: tuple[int, ...]       # [Hkv']
    q_src: tuple[int, ...]        # [Hq'] ; q head i belongs to kv head i // (Hq' / Hkv')

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_src)

    @property
    def num_heads(self) -> int:
        return len(self.q_src)

    @property
    def is_identity(self) -> bool:
        return self.kv_src == tuple(range(len(self.kv_src))) and self.q_src == tuple(range(len(self.q_src)))


def head_layout(num_heads: int, num_kv_heads: int, tp: int) -> HeadLayout:
    """Smallest (Hq' + Hkv') layout with Hkv' % tp == 0 that computes the same attention."""
    G = num_heads // num_kv_heads
    best = None
    for r in range(1, tp + 1):                   # copies of each KV head
        g = -(-G // r)                           # query heads per copy
        kv, q = [], []
        for h in range(num_kv_heads):
            for c in range(r):
                kv.append(h)
                q += [h * G + c * g + t if c * g + t < G else -1 for t in range(g)]
        while len(kv) % tp:
            kv.append(-1)
            q += [-1] * g
        cand = HeadLayout(tuple(kv), tuple(q))
        if best is None or cand.num_heads + cand.num_kv_heads < best.num_heads + best.num_kv_heads:
            best = cand
    return best


def padded_config(cfg: ModelConfig, layout: HeadLayout) -> ModelConfig:
    return dataclasses.replace(cfg, num_heads=layout.num_heads, num_kv_heads=layout.num_kv_heads)


def _take_heads(w: np.ndarray, axis: int, src: tuple[int, ...], Dh: int) -> np.ndarray:
    """Re-order / replicate / zero-pad the head axis (``axis`` has size H*Dh)."""
    shape = w.shape
    H = shape[axis] // Dh
    w = w.reshape(shape[:axis] + (H, Dh) + shape[axis + 1:])
    idx = np.asarray([max(s, 0) for s in src])
    out = np.take(w, idx, axis=axis)
    dummy = np.asarray([s < 0 for s in src])
    if dummy.any():
        mask_shape = [1] * out.ndim
        mask_shape[axis] = len(src)
        out = np.where(dummy.reshape(mask_shape), np.zeros((), out.dtype), out)
    return out.reshape(shape[:axis] + (len(src) * Dh,) + shape[axis + 1:])


def relayout_params(params: dict, cfg: ModelConfig, layout: HeadLayout) -> dict:
    """Storage-layout numpy params of ``cfg`` -> those of ``padded_config(cfg, layout)`` (same function)."""
    if layout.is_identity:
        return params
    Dh = cfg.head_dim
    lay = dict(params["layers"])
    for name, src, axis in (("wq", layout.q_src, 2), ("wk", layout.kv_src, 2), ("wv", layout.kv_src, 2),
                            ("wo", layout.q_src, 1), ("bq", layout.q_src, 1), ("bk", layout.kv_src, 1),
                            ("bv", layout.kv_src, 1)):
        if name in lay:
            lay[name] = _take_heads(np.asarray(lay[name]), axis, src, Dh)
    return {**params, "layers": lay}


def make_mesh(tp: int, devices=None) -> Mesh:
    """A 1-D mesh over the first ``tp`` devices (all processes' devices in multi-host runs)."""
    devices = list(devices if devices is not None else jax.devices())
    if tp > len(devices):
        raise ValueError(f"tensor_parallel={tp} but only {len(devices)} device(s) are visible")
    return Mesh(np.asarray(devices[:tp]), (AXIS,))


def param_specs(params: dict, cfg: ModelConfig, tp: int) -> dict:
    """PartitionSpec per runtime parameter (models/llama.py ``runtime_params``: weights are
    ``[out, in]``); see the module docstring. Dims that do not divide ``tp`` stay replicated."""
    F, V = cfg.intermediate_size, cfg.vocab_size
    col, row = P(AXIS, None), P(None, AXIS)             # split output features / input features
    experts = P(AXIS, None, None) if cfg.num_experts and cfg.num_experts % tp == 0 else P()
    layer_spec = {"wq": col, "wk": col, "wv": col, "bq": P(AXIS), "bk": P(AXIS), "bv": P(AXIS), "wo": row,
                  "w_gate": col if F % tp == 0 else P(), "w_up": col if F % tp == 0 else P(),
                  "w_down": row if F % tp == 0 else P(),
                  "we_gate": experts, "we_up": experts, "we_down": experts}    # router, q/k norms: replicated
    specs: dict = {}
    for name, v in params.items():
        if isinstance(v, dict):
            specs[name] = {k: layer_spec.get(k, P()) for k in v}
        elif name == "lm_head":
            specs[name] = P(AXIS, None) if V % tp == 0 else P()
        else:
            specs[name] = P()
    return specs


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Host array (identical on every process) -> global array with ``sharding``."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_params(params: dict, specs: dict, mesh: Mesh, dtype) -> dict:
    return jax.tree.map(lambda a, s: put_global(np.asarray(a).astype(dtype), NamedSharding(mesh, s)),
                        params, specs, is_leaf=lambda x: isinstance(x, P))


def to_host(tree):
    """Fetch replicated outputs as numpy; works when arrays span other processes' devices."""
    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)
    return jax.tree.map(get, tree)

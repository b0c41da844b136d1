"""HF checkpoint tensors of one decoder layer -> Ferry's storage layout (models/config.py).

Per family:
  all        input_layernorm -> attn_norm; self_attn.{q,k,v,o}_proj -> wq, wk, wv, wo ([in, out])
  Llama-like post_attention_layernorm -> mlp_norm; mlp.{gate,up,down}_proj -> w_gate, w_up, w_down
  Qwen2      self_attn.{q,k,v}_proj.bias -> bq, bk, bv
  Qwen3, Gemma 3, Qwen3-MoE   self_attn.{q,k}_norm -> q_norm, k_norm
  Gemma 2/3  post_attention_layernorm -> post_attn_norm; pre_feedforward_layernorm -> mlp_norm;
             post_feedforward_layernorm -> post_mlp_norm; every norm stored as 1 + w
  Phi-3      self_attn.qkv_proj [(Hq + 2 Hkv) Dh, D] -> wq, wk, wv; mlp.gate_up_proj [2F, D] -> w_gate, w_up
  Mixtral    block_sparse_moe.gate [E, D] -> router; block_sparse_moe.experts.e.{w1, w3, w2} -> we_gate, we_up, we_down
  Qwen3-MoE  mlp.gate -> router; mlp.experts.e.{gate,up,down}_proj -> we_gate, we_up, we_down
  (transformers 5 in-memory names mlp.experts.gate_up_proj [E, 2F, D] / down_proj [E, D, F] are read too)
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ferry.models.config import ModelConfig

GEMMA = ("gemma2", "gemma3")


def _split_rows(w: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(w, np.cumsum(sizes)[:-1], axis=0)


def _experts(cfg: ModelConfig, get, has, pre: str) -> dict[str, np.ndarray]:
    E, F = cfg.num_experts, cfg.intermediate_size
    if cfg.architecture == "mixtral" and has(pre + "block_sparse_moe.gate.weight"):
        base, names = pre + "block_sparse_moe.", ("w1", "w3", "w2")
    else:
        base, names = pre + "mlp.", ("gate_proj", "up_proj", "down_proj")
    out = {"router": get(base + "gate.weight").T}                                  # [D, E]
    if has(base + "experts.gate_up_proj"):                                       # fused (transformers 5)
        gu = get(base + "experts.gate_up_proj")                                  # [E, 2F, D]
        out.update(we_gate=gu[:, :F].transpose(0, 2, 1), we_up=gu[:, F:].transpose(0, 2, 1),
                   we_down=get(base + "experts.down_proj").transpose(0, 2, 1))   # [E, F, D]
        return out
    for key, n in zip(("we_gate", "we_up", "we_down"), names):
        out[key] = np.stack([get(f"{base}experts.{e}.{n}.weight").T for e in range(E)])
    return out


def hf_layer(cfg: ModelConfig, get: Callable[[str], np.ndarray], has: Callable[[str], bool],
             pre: str) -> dict[str, np.ndarray]:
    """Tensors of the layer whose names start with ``pre`` ("model.layers.3.")."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    lin = lambda n: get(pre + n).T      # noqa: E731   [out, in] -> [in, out]
    out = {"attn_norm": get(pre + "input_layernorm.weight")}
    if cfg.architecture in GEMMA:
        out.update(post_attn_norm=get(pre + "post_attention_layernorm.weight"),
                   mlp_norm=get(pre + "pre_feedforward_layernorm.weight"),
                   post_mlp_norm=get(pre + "post_feedforward_layernorm.weight"))
    else:
        out["mlp_norm"] = get(pre + "post_attention_layernorm.weight")
    if has(pre + "self_attn.qkv_proj.weight"):                                    # Phi-3
        wq, wk, wv = _split_rows(get(pre + "self_attn.qkv_proj.weight"), [q, kv, kv])
        out.update(wq=wq.T, wk=wk.T, wv=wv.T)
    else:
        out.update(wq=lin("self_attn.q_proj.weight"), wk=lin("self_attn.k_proj.weight"),
                   wv=lin("self_attn.v_proj.weight"))
    out["wo"] = lin("self_attn.o_proj.weight")
    if cfg.attention_bias:
        out.update(bq=get(pre + "self_attn.q_proj.bias"), bk=get(pre + "self_attn.k_proj.bias"),
                   bv=get(pre + "self_attn.v_proj.bias"))
    if cfg.qk_norm:
        out.update(q_norm=get(pre + "self_attn.q_norm.weight"), k_norm=get(pre + "self_attn.k_norm.weight"))
    if cfg.num_experts:
        out.update(_experts(cfg, get, has, pre))
    elif has(pre + "mlp.gate_up_proj.weight"):                                    # Phi-3: gate first
        g, u = _split_rows(get(pre + "mlp.gate_up_proj.weight"), [cfg.intermediate_size] * 2)
        out.update(w_gate=g.T, w_up=u.T, w_down=lin("mlp.down_proj.weight"))
    else:
        out.update(w_gate=lin("mlp.gate_proj.weight"), w_up=lin("mlp.up_proj.weight"),
                   w_down=lin("mlp.down_proj.weight"))
    return out


def gemma_norms_plus_one(params: dict) -> dict:
    """Gemma's RMSNorm applies ``1 + w``: store the multiplier (f32), as llama.cpp's GGUFs do."""
    plus = lambda a: np.asarray(a, np.float32) + 1.0   # noqa: E731
    lay = {k: plus(v) if k.endswith("norm") else v for k, v in params["layers"].items()}
    return {**params, "final_norm": plus(params["final_norm"]), "layers": lay}

"""HF ``config.json`` -> ``ModelConfig`` keyword arguments for each supported family.

``config_kwargs(cfg, name)`` returns plain values (``rope_scaling`` as a dict of
``RopeScaling`` fields) so that this module needs nothing from models/config.py;
``ModelConfig.from_hf_dict`` builds the config from them.

Reads both the transformers-5 layout (``rope_parameters``, possibly nested per layer
type; ``layer_types``) and the older Hub layout (``rope_theta`` / ``rope_scaling`` /
``rope_local_base_freq``, ``sliding_window_pattern``). Anything Ferry does not compute
(longrope, partial rotary, dense layers inside an MoE stack, ...) is a ValueError
naming it, never a silently different model.
"""
from __future__ import annotations

from typing import Any, Mapping

# HF architecture -> Ferry family name (ModelConfig.architecture)
FAMILIES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
            "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
            "Phi3ForCausalLM": "phi3", "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3moe"}
_ACT = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def parse_rope(rp: Mapping[str, Any] | None, what: str) -> dict | None:
    """One rope dict (``rope_scaling`` or a ``rope_parameters`` entry) -> ``RopeScaling`` fields
    (None = plain RoPE)."""
    kind = (rp or {}).get("rope_type", (rp or {}).get("type"))
    if kind in (None, "default"):
        return None
    if kind == "llama3":
        return dict(factor=float(rp["factor"]), low_freq_factor=float(rp["low_freq_factor"]),
                    high_freq_factor=float(rp["high_freq_factor"]),
                    original_max_position_embeddings=int(rp["original_max_position_embeddings"]))
    if kind == "linear":
        return dict(factor=float(rp["factor"]), rope_type="linear")
    raise ValueError(f"{what}: unsupported rope scaling {dict(rp)!r}")


def _rope(cfg: Mapping[str, Any], family: str, what: str):
    """(theta, scaling, local_theta) of global layers / sliding layers."""
    rp = cfg.get("rope_parameters")
    if rp and "full_attention" in rp:                          # transformers 5, per layer type (Gemma 3)
        full, local = rp["full_attention"], rp.get("sliding_attention") or rp["full_attention"]
        if parse_rope(local, what) is not None:
            raise ValueError(f"{what}: rope scaling on sliding layers is not supported")
        return float(full.get("rope_theta", 10000.0)), parse_rope(full, what), float(local.get("rope_theta", 10000.0))
    if rp:
        if float(rp.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(f"{what}: partial rotary embeddings are not supported")
        theta, scaling = rp.get("rope_theta", cfg.get("rope_theta", 10000.0)), parse_rope(rp, what)
    else:
        theta, scaling = cfg.get("rope_theta", 10000.0), parse_rope(cfg.get("rope_scaling"), what)
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{what}: partial rotary embeddings are not supported")
    local = cfg.get("rope_local_base_freq") if family == "gemma3" else None
    return float(theta), scaling, (float(local) if local is not None else None)


def _layer_types(cfg: Mapping[str, Any], family: str, L: int, window: int | None) -> tuple[str, ...]:
    if window is None:
        return ()
    if cfg.get("layer_types"):
        return tuple(cfg["layer_types"])
    S, F = "sliding_attention", "full_attention"
    if family == "gemma2":
        return tuple(S if i % 2 == 0 else F for i in range(L))
    if family == "gemma3":
        n = int(cfg.get("sliding_window_pattern") or 6)
        return tuple(S if (i + 1) % n else F for i in range(L))
    if family in ("qwen2", "qwen3", "qwen3moe"):
        first = int(cfg.get("max_window_layers", L))
        return tuple(S if i >= first else F for i in range(L))
    return (S,) * L                                               # Mistral, Mixtral, Phi-3: every layer


def config_kwargs(cfg: Mapping[str, Any], name: str = "model") -> dict[str, Any]:
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    arch = archs[0]
    if arch not in FAMILIES:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(FAMILIES)}")
    fam = FAMILIES[arch]
    what = f"{name}/config.json ({arch})"
    num_heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    L = int(cfg["num_hidden_layers"])
    head_dim = int(cfg.get("head_dim") or hidden // num_heads)
    theta, scaling, local_theta = _rope(cfg, fam, what)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    window = cfg.get("sliding_window")
    if fam in ("qwen2", "qwen3", "qwen3moe") and not cfg.get("use_sliding_window", False):
        window = None
    window = int(window) if window else None
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in _ACT:
        raise ValueError(f"{what}: unsupported activation {act!r}")
    gemma = fam in ("gemma2", "gemma3")
    F, experts, top_k = int(cfg["intermediate_size"]), 0, 0
    if fam == "mixtral":
        experts, top_k = int(cfg["num_local_experts"]), int(cfg["num_experts_per_tok"])
    elif fam == "qwen3moe":
        E = cfg.get("num_experts", cfg.get("num_local_experts"))                # transformers 5 renames it
        experts, top_k, F = int(E), int(cfg["num_experts_per_tok"]), int(cfg["moe_intermediate_size"])
        if int(cfg.get("decoder_sparse_step", 1)) != 1 or cfg.get("mlp_only_layers"):
            raise ValueError(f"{what}: dense layers inside an MoE stack (decoder_sparse_step / mlp_only_layers) "
                             f"are not supported")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError(f"{what}: bidirectional attention (embedding models) is not supported")
    bias = bool(cfg.get("attention_bias", False)) or fam == "qwen2"
    if bias and fam != "qwen2":
        raise ValueError(f"{what}: attention_bias (incl. an o_proj bias) is only supported for Qwen2")
    qpas = cfg.get("query_pre_attn_scalar") if gemma else None
    return dict(
        vocab_size=int(cfg["vocab_size"]), hidden_size=hidden, intermediate_size=F, num_layers=L,
        num_heads=num_heads, num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads), head_dim=head_dim,
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)), attention_bias=bias,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=tuple(int(e) for e in eos_ids),
        architecture=fam, name=name,
        qk_norm=fam in ("qwen3", "qwen3moe", "gemma3"), sliding_window=window,
        layer_types=_layer_types(cfg, fam, L, window), rope_local_theta=local_theta,
        attn_scale=float(qpas) ** -0.5 if qpas else None,
        attn_logit_softcap=(float(cfg["attn_logit_softcapping"]) if gemma and cfg.get("attn_logit_softcapping")
                            else None),
        final_logit_softcap=(float(cfg["final_logit_softcapping"]) if gemma and cfg.get("final_logit_softcapping")
                             else None),
        sandwich_norm=gemma, hidden_act=_ACT[act], scale_embeddings=gemma,
        num_experts=experts, num_experts_per_tok=top_k,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)) if fam == "qwen3moe" else True)

"""GGUF metadata (llama.cpp keys, ``{arch}.*``) -> ``ModelConfig`` for each supported architecture.

GGUF architectures and the Ferry family they load as:
  llama (-> "llama", or "mixtral" with ``llama.expert_count``), mistral, qwen2, qwen3, qwen3moe,
  gemma2, gemma3, phi3.
What llama.cpp hard-codes instead of storing, and Ferry therefore assumes too:
  gemma2: every even layer is sliding; gemma3: every 6th layer is global (unless
  ``attention.sliding_window_pattern`` says otherwise), local RoPE base 10000 (unless
  ``rope.freq_base_swa``); Gemma's attention scale is head_dim^-0.5 except for the 27B models
  (hidden / heads), as llama.cpp decides by layer count; qwen3moe renormalises its top-k
  weights unless ``expert_weights_norm`` is false.
"""
from __future__ import annotations

import os

from ferry.models.config import ModelConfig, RopeScaling

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3")
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def model_name(path: str) -> str:
    """"SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"."""
    stem = os.path.basename(path)
    stem = stem[:-5] if stem.endswith(".gguf") else stem
    head, _, tail = stem.rpartition(".")
    return head if head and (tail.upper().startswith(("Q", "F", "BF", "IQ"))) else stem


def _rope_scaling(meta: dict, arch: str, path: str) -> RopeScaling | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return RopeScaling(factor=float(meta[f"{arch}.rope.scaling.factor"]), rope_type="linear")
    raise ValueError(f"{path}: rope scaling type {kind!r} is not supported (only linear and Llama-3 rope_freqs)")


def _layer_types(meta: dict, arch: str, L: int, window: int | None) -> tuple[str, ...]:
    if window is None:
        return ()
    S, F = "sliding_attention", "full_attention"
    pat = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pat, (list, tuple)):
        return tuple(S if p else F for p in pat)
    if arch == "gemma2":
        pat = pat or 2
    elif arch == "gemma3":
        pat = pat or 6
    if pat:
        return tuple(S if (i + 1) % int(pat) else F for i in range(L))
    return (S,) * L


def config_from_metadata(meta: dict, tensor_names: set[str], path: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
    a = lambda k, d=None: meta.get(f"{arch}.{k}", d)  # noqa: E731
    try:
        D, Hq, L = int(a("embedding_length")), int(a("attention.head_count")), int(a("block_count"))
        Dh = int(a("attention.key_length", D // Hq))
        if int(a("rope.dimension_count", Dh)) != Dh:
            raise ValueError(f"{path}: partial rotary embeddings are not supported")
        if "rope_factors_long.weight" in tensor_names:
            raise ValueError(f"{path}: LongRoPE (rope_factors_long/short) is not supported")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eot = meta.get("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(dict.fromkeys(int(i) for i in (eos, eot) if i is not None))
        experts = int(a("expert_count", 0) or 0)
        F = int((experts and a("expert_feed_forward_length")) or a("feed_forward_length"))
        gemma = arch in ("gemma2", "gemma3")
        window = a("attention.sliding_window")
        window = int(window) if window else None
        scale = None
        if gemma:
            scale = (D / Hq if L == _GEMMA_27B_LAYERS[arch] else Dh) ** -0.5
        cap = lambda k: float(a(k)) if gemma and a(k) else None  # noqa: E731
        family = "mixtral" if arch == "llama" and experts else arch
        return ModelConfig(
            vocab_size=len(meta["tokenizer.ggml.tokens"]), hidden_size=D, intermediate_size=F, num_layers=L,
            num_heads=Hq, num_kv_heads=int(a("attention.head_count_kv", Hq)), head_dim=Dh,
            rope_theta=float(a("rope.freq_base", 10000.0)),
            rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            max_position_embeddings=int(a("context_length", 2048)),
            rope_scaling=_rope_scaling(meta, arch, path),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_ids=eos_ids,
            architecture=family, name=model_name(path),
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names, sliding_window=window,
            layer_types=_layer_types(meta, arch, L, window),
            rope_local_theta=float(a("rope.freq_base_swa", 10000.0)) if arch == "gemma3" else None,
            attn_scale=scale, attn_logit_softcap=cap("attn_logit_softcapping"),
            final_logit_softcap=cap("final_logit_softcapping"), sandwich_norm=gemma,
            hidden_act="gelu_tanh" if gemma else "silu", scale_embeddings=gemma,
            num_experts=experts, num_experts_per_tok=int(a("expert_used_count", 0) or 0),
            norm_topk_prob=bool(a("expert_weights_norm", True)))
    except KeyError as e:
        raise ValueError(f"{path}: GGUF metadata lacks {e.args[0]!r}") from e

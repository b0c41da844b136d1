"""Model configuration of every decoder family Ferry serves (docs/MODELS.md).

One frozen dataclass, built from GGUF metadata (models/gguf_config.py) or from an HF
``config.json`` (models/hf_config.py). Families differ only by the features below
(q/k norms, sliding windows, soft-caps, sandwich norms, GeLU, scaled embeddings,
routed experts); models/llama.py is one decoder driven by them.
Parameter layout used everywhere in Ferry (``params`` pytree; weights are
``[in, out]``; per-layer tensors are stacked on a leading ``L`` axis)::

    embed:       f[V, D]
    final_norm:  f[D]
    lm_head:     f[D, V]            (absent when tie_word_embeddings)
    layers:
      attn_norm: f[L, D]            mlp_norm: f[L, D]
      wq: f[L, D, Hq*Dh]  wk: f[L, D, Hkv*Dh]  wv: f[L, D, Hkv*Dh]  wo: f[L, Hq*Dh, D]
      bq: f[L, Hq*Dh]     bk: f[L, Hkv*Dh]     bv: f[L, Hkv*Dh]     (only if attention_bias)
      w_gate: f[L, D, F]  w_up: f[L, D, F]     w_down: f[L, F, D]     (dense MLP; absent with experts)
      q_norm: f[L, Dh]    k_norm: f[L, Dh]     (only if qk_norm: per-head RMSNorm, Qwen3 / Gemma 3)
      post_attn_norm, post_mlp_norm: f[L, D]   (only if sandwich_norm: Gemma 2/3; mlp_norm is the pre-MLP norm)
      router: f[L, D, E]                       (only if num_experts: Mixtral / Qwen3-MoE)
      we_gate: f[L, E, D, F]  we_up: f[L, E, D, F]  we_down: f[L, E, F, D]   (experts, F = expert width)

Norm weights are the multipliers actually applied: Gemma's ``(1 + w)`` RMSNorm is
stored as ``1 + w`` (llama.cpp's GGUF converter stores it the same way).

q/k projections use the HF ("rotate_half") RoPE layout; GGUF's interleaved
layout is un-permuted at load time.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3"), or "linear" (positions / factor, Gemma 3)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int            # D
    intermediate_size: int      # F
    num_layers: int             # L
    num_heads: int              # Hq
    num_kv_heads: int           # Hkv
    head_dim: int               # Dh
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "llama"
    name: str = "model"
    # ---- family features (defaults = Llama) ----
    qk_norm: bool = False                     # per-head RMSNorm of q and k before RoPE
    sliding_window: int | None = None         # key p' visible from query p iff p' > p - window
    layer_types: tuple[str, ...] = ()         # per layer "sliding_attention" | "full_attention"; () = all full
    rope_local_theta: float | None = None     # RoPE base of sliding layers (Gemma 3; no scaling there)
    attn_scale: float | None = None           # q.k multiplier; None = head_dim ** -0.5
    attn_logit_softcap: float | None = None   # scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    sandwich_norm: bool = False               # Gemma 2/3: norms before and after attention and MLP
    hidden_act: str = "silu"                  # "silu" | "gelu_tanh"
    scale_embeddings: bool = False            # Gemma: embeddings * sqrt(D)
    num_experts: int = 0                      # E; 0 = dense MLP
    num_experts_per_tok: int = 0              # top-k
    norm_topk_prob: bool = True               # renormalise the top-k softmax weights

    def window(self, layer: int) -> int | None:
        """Sliding window of ``layer`` (None = global attention)."""
        if self.sliding_window is None or not self.layer_types:
            return None
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim"):
            if getattr(self, f) <= 0:
                raise ValueError(f"model config: {f} must be positive, got {getattr(self, f)}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"model config: {len(self.layer_types)} layer_types for {self.num_layers} layers")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"model config: unsupported hidden_act {self.hidden_act!r}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"model config: num_experts_per_tok={self.num_experts_per_tok} "
                             f"with num_experts={self.num_experts}")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        D, F, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        mlp = self.num_experts * 3 * D * F + D * self.num_experts if self.num_experts else 3 * D * F
        per_layer = 2 * D + D * q + 2 * D * kv + q * D + mlp
        if self.attention_bias:
            per_layer += q + 2 * kv
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        if self.sandwich_norm:
            per_layer += 2 * D
        return V * D + D + L * per_layer + (0 if self.tie_word_embeddings else D * V)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any], name: str = "model") -> "ModelConfig":
        """Build from an HF ``config.json`` dict (families in models/hf_config.py)."""
        from ferry.models.hf_config import config_kwargs
        kw = config_kwargs(cfg, name)
        rs = kw.pop("rope_scaling")
        return cls(rope_scaling=RopeScaling(**rs) if rs else None, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        rs = d.pop("rope_scaling", None)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["layer_types"] = tuple(d.get("layer_types", ()))
        return cls(rope_scaling=RopeScaling(**rs) if rs else None, **d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# Shapes of real models, for benchmarks with random weights.
SHAPES: dict[str, ModelConfig] = {
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001, 128009),
        name="llama-3.2-1b"),
    "llama-3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        max_position_embeddings=8192, bos_token_id=128000, eos_token_ids=(128001, 128009),
        name="llama-3-8b"),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
        max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,), name="smollm2-135m"),
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position_embeddings=1024, eos_token_ids=(2,), name="tiny"),
    # SmolLM2-like head grouping (3 KV heads, bias like Qwen2): under tensor parallel 2/4 its
    # heads must be replicated / padded (engine/sharding.py).
    "tiny-gqa3": ModelConfig(
        vocab_size=512, hidden_size=96, intermediate_size=192, num_layers=2, num_heads=9,
        num_kv_heads=3, head_dim=16, attention_bias=True,
        max_position_embeddings=1024, eos_token_ids=(2,), name="tiny-gqa3"),
    # Every Gemma 2/3 feature at once (sliding + global layers with their own RoPE bases, soft-caps,
    # q/k norms, sandwich norms, GeLU, scaled embeddings) and a routed-experts model.
    "tiny-gemma": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=1024, eos_token_ids=(2,),
        architecture="gemma3", name="tiny-gemma", qk_norm=True, sliding_window=8,
        layer_types=("sliding_attention", "full_attention"), rope_local_theta=10000.0, rope_theta=1e6,
        attn_scale=24 ** -0.5, attn_logit_softcap=5.0, final_logit_softcap=3.0, sandwich_norm=True,
        hidden_act="gelu_tanh", scale_embeddings=True),
    "tiny-moe": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, max_position_embeddings=1024, eos_token_ids=(2,), architecture="qwen3moe", name="tiny-moe",
        qk_norm=True, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
}

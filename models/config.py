"""Model configuration for Llama-family decoders (Llama 2/3, SmolLM, Mistral, Qwen2).

One frozen dataclass, built from GGUF metadata or from an HF ``config.json``.
Parameter layout used everywhere in Ferry (``params`` pytree; weights are
``[in, out]``; per-layer tensors are stacked on a leading ``L`` axis)::

    embed:       f[V, D]
    final_norm:  f[D]
    lm_head:     f[D, V]            (absent when tie_word_embeddings)
    layers:
      attn_norm: f[L, D]            mlp_norm: f[L, D]
      wq: f[L, D, Hq*Dh]  wk: f[L, D, Hkv*Dh]  wv: f[L, D, Hkv*Dh]  wo: f[L, Hq*Dh, D]
      bq: f[L, Hq*Dh]     bk: f[L, Hkv*Dh]     bv: f[L, Hkv*Dh]     (only if attention_bias)
      w_gate: f[L, D, F]  w_up: f[L, D, F]     w_down: f[L, F, D]

q/k projections use the HF ("rotate_half") RoPE layout; GGUF's interleaved
layout is un-permuted at load time.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


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

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim"):
            if getattr(self, f) <= 0:
                raise ValueError(f"model config: {f} must be positive, got {getattr(self, f)}")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        D, F, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = 2 * D + D * q + 2 * D * kv + q * D + 3 * D * F
        if self.attention_bias:
            per_layer += q + 2 * kv
        return V * D + D + L * per_layer + (0 if self.tie_word_embeddings else D * V)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any], name: str = "model") -> "ModelConfig":
        """Build from an HF ``config.json`` dict (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)."""
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        supported = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
        if arch not in supported:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(supported)}")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // num_heads)
        rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None   # transformers 5 nests it
        scaling = None
        if rs and rs.get("rope_type", rs.get("type")) == "llama3":
            scaling = RopeScaling(
                factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                high_freq_factor=float(rs["high_freq_factor"]),
                original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
        elif rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
            raise ValueError(f"unsupported rope_scaling {rs!r}")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None:
            rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]), num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads), head_dim=head_dim,
            rope_theta=float(rope_theta), rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=tuple(int(e) for e in eos_ids),
            architecture={"Qwen2ForCausalLM": "qwen2"}.get(arch, "llama"), name=name)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        rs = d.pop("rope_scaling", None)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
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
}

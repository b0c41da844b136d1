"""Random weights of a real model's shape ("random:llama-3.2-1b"), for benchmarks.

No weights beyond the default model can be downloaded here, so larger models
are benchmarked with random parameters of the real shapes (``SHAPES`` in
models/config.py). The tokenizer is a trivial byte tokenizer: ids 3..258
are bytes, others decode to nothing.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ferry.models.config import SHAPES, ModelConfig


class ByteTokenizer:
    """Bytes <-> ids (id = byte + 3); 0 pad, 1 bos, 2 eos."""

    bos_token_id = 1

    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...] = (2,)) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")


def random_params(cfg: ModelConfig, seed: int = 0, dtype=np.float32, on_device: bool = False) -> dict:
    """Params in Ferry's layout (see models/config.py): N(0, 1/fan_in) weights, unit norms.

    numpy arrays from ``np.random.default_rng(seed)``; with ``on_device``, JAX arrays drawn on the
    default device instead (other values for the same seed). An 8B model drawn in numpy takes
    minutes of host time and 32 GB of host memory before it reaches a GPU; on the GPU it is instant.
    """
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if on_device:
        import jax
        import jax.numpy as jnp
        keys = iter(jax.random.split(jax.random.key(seed), 64))
        ones = lambda shape: jnp.ones(shape, dtype)  # noqa: E731
        normal = lambda shape: jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    else:
        rng = np.random.default_rng(seed)
        ones = lambda shape: np.ones(shape, dtype)  # noqa: E731
        normal = lambda shape: rng.standard_normal(shape, np.float32)  # noqa: E731

    def w(*shape):   # std 1/sqrt(fan_in): activations keep unit scale, so outputs are not degenerate
        return (normal(shape) / np.sqrt(shape[-2])).astype(dtype)

    layers = {"attn_norm": ones((L, D)), "mlp_norm": ones((L, D)),
              "wq": w(L, D, q), "wk": w(L, D, kv), "wv": w(L, D, kv), "wo": w(L, q, D)}
    if cfg.num_experts:
        E = cfg.num_experts
        layers.update(router=w(L, D, E), we_gate=w(L, E, D, F), we_up=w(L, E, D, F), we_down=w(L, E, F, D))
    else:
        layers.update(w_gate=w(L, D, F), w_up=w(L, D, F), w_down=w(L, F, D))
    if cfg.attention_bias:
        layers.update(bq=w(L, q), bk=w(L, kv), bv=w(L, kv))
    if cfg.qk_norm:
        layers.update(q_norm=ones((L, cfg.head_dim)), k_norm=ones((L, cfg.head_dim)))
    if cfg.sandwich_norm:
        layers.update(post_attn_norm=ones((L, D)), post_mlp_norm=ones((L, D)))
    params = {"embed": normal((V, D)).astype(dtype), "final_norm": ones((D,)), "layers": layers}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = w(D, V)
    return params


@dataclasses.dataclass(frozen=True)
class RandomBundle:
    config: ModelConfig
    params: dict
    tokenizer: ByteTokenizer
    name: str
    source_path: str


def random_bundle(spec: str, seed: int = 0, dtype=np.float32, on_device: bool = False) -> RandomBundle:
    """``spec`` is "random:<shape>" with a shape name from ferry.models.config.SHAPES."""
    shape = spec.split(":", 1)[1]
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(sorted(SHAPES))}")
    cfg = SHAPES[shape]
    return RandomBundle(cfg, random_params(cfg, seed, dtype, on_device), ByteTokenizer(cfg.vocab_size, cfg.eos_token_ids),
                        f"random-{shape}", spec)

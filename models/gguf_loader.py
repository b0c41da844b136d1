"""GGUF -> (ModelConfig, storage-layout numpy params, Tokenizer).

Tensor names (llama.cpp) -> Ferry's storage layout (models/config.py):
  token_embd -> embed [V, D]; output_norm -> final_norm; output -> lm_head [D, V] (absent: tied)
  blk.N.{attn_norm, ffn_norm} -> attn_norm, mlp_norm
  blk.N.{attn_q, attn_k, attn_v, attn_output} -> wq, wk, wv, wo   ([in, out])
  blk.N.{attn_q, attn_k, attn_v}.bias -> bq, bk, bv              (qwen2)
  blk.N.{ffn_gate, ffn_up, ffn_down} -> w_gate, w_up, w_down
llama.cpp's converter interleaves the rows of q/k for Llama-architecture
models (its RoPE pairs adjacent dims); they are un-permuted back to the HF
"rotate_half" layout that models/llama.py uses.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ferry.models.config import ModelConfig, RopeScaling
from ferry.models.gguf_quants import dequantize
from ferry.models.tokenizer import Tokenizer

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
_PERMUTED_QK = ("llama", "mistral")
_LAYER = {"attn_norm.weight": "attn_norm", "ffn_norm.weight": "mlp_norm", "attn_q.weight": "wq",
          "attn_k.weight": "wk", "attn_v.weight": "wv", "attn_output.weight": "wo", "attn_q.bias": "bq",
          "attn_k.bias": "bk", "attn_v.bias": "bv", "ffn_gate.weight": "w_gate", "ffn_up.weight": "w_up",
          "ffn_down.weight": "w_down"}


def _open(path: str):
    from gguf import GGUFReader
    if not os.path.isfile(path):
        raise ValueError(f"model file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic bytes)")
    try:
        return GGUFReader(path, "r")
    except Exception as e:                  # truncated / corrupt headers raise assorted errors
        raise ValueError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e


def read_metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:                   # unusual value types we do not need
            continue
    return meta


def config_from_metadata(meta: dict, tensor_names: set[str], path: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
    a = lambda k, d=None: meta.get(f"{arch}.{k}", d)  # noqa: E731
    try:
        D, Hq = int(a("embedding_length")), int(a("attention.head_count"))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eot = meta.get("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(dict.fromkeys(int(i) for i in (eos, eot) if i is not None))
        return ModelConfig(
            vocab_size=len(meta["tokenizer.ggml.tokens"]), hidden_size=D,
            intermediate_size=int(a("feed_forward_length")), num_layers=int(a("block_count")),
            num_heads=Hq, num_kv_heads=int(a("attention.head_count_kv", Hq)),
            head_dim=int(a("attention.key_length", D // Hq)), rope_theta=float(a("rope.freq_base", 10000.0)),
            rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            max_position_embeddings=int(a("context_length", 2048)),
            rope_scaling=_rope_scaling(meta, arch, path),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_ids=eos_ids,
            architecture=arch, name=model_name(path))
    except KeyError as e:
        raise ValueError(f"{path}: GGUF metadata lacks {e.args[0]!r}") from e


def _rope_scaling(meta: dict, arch: str, path: str) -> RopeScaling | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        raise ValueError(f"{path}: rope scaling type {kind!r} is not supported (only Llama-3 rope_freqs)")
    return None


def llama3_scaling_from_freqs(factors: np.ndarray, head_dim: int, theta: float, orig_ctx: int | None,
                              path: str) -> RopeScaling:
    """Recover Llama-3 rope scaling from llama.cpp's ``rope_freqs`` tensor (per-frequency divisors f[Dh/2]).

    GGUF stores only the resulting factors; the Llama-3.x parameters (low 1, high 4,
    factor = max factor, original context 8192) are checked by recomputing them.
    """
    factor = float(np.max(factors))
    cand = RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=int(orig_ctx or 8192))
    if not np.allclose(llama3_factors(cand, head_dim, theta), factors, rtol=1e-4, atol=1e-6):
        raise ValueError(f"{path}: rope_freqs do not match Llama-3 rope scaling; not supported")
    return cand


def llama3_factors(rs: RopeScaling, head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors f[Dh/2] of Llama-3 rope scaling (1 = unscaled, ``factor`` = low frequencies)."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv
    lo_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    hi_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    mid = 1.0 / ((1 - smooth) / rs.factor + smooth)
    return np.where(wavelen < hi_wl, 1.0, np.where(wavelen > lo_wl, rs.factor, mid)).astype(np.float32)


def model_name(path: str) -> str:
    """"SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"."""
    stem = os.path.basename(path)
    stem = stem[:-5] if stem.endswith(".gguf") else stem
    head, _, tail = stem.rpartition(".")
    return head if head and (tail.upper().startswith(("Q", "F", "BF", "IQ"))) else stem


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleave. w: [out, in] with out = n_head * Dh."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str, progress: bool = False) -> tuple[ModelConfig, dict, Tokenizer]:
    """Read config, tokenizer and f32 params from a GGUF file (ValueError names the problem)."""
    reader = _open(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_metadata(meta, set(tensors), path)
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        f = dequantize(np.asarray(t.data), int(t.tensor_type), (int(t.n_elements),), what=f"{path}: rope_freqs")
        orig = meta.get(f"{cfg.architecture}.rope.scaling.original_context_length")
        cfg = dataclasses.replace(cfg, rope_scaling=llama3_scaling_from_freqs(
            f, cfg.head_dim, cfg.rope_theta, orig, path))
    tokenizer = Tokenizer.from_gguf_metadata(meta, what=path)

    def get(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{path}: tensor {name!r} is missing")
        shape = tuple(int(x) for x in reversed(t.shape))               # numpy order: [out, in]
        return dequantize(np.asarray(t.data), int(t.tensor_type), shape, what=f"{path}: {name}")

    L = cfg.num_layers
    items = [(f"blk.{i}.{suffix}", i, key) for i in range(L) for suffix, key in _LAYER.items()
             if f"blk.{i}.{suffix}" in tensors]
    it = items
    if progress:
        from tqdm import tqdm
        it = tqdm(items, desc=f"loading {os.path.basename(path)}", unit="tensor", leave=False)
    layers: dict[str, list] = {}
    for name, i, key in it:
        w = get(name)
        if key in ("wq", "wk", "bq", "bk") and cfg.architecture in _PERMUTED_QK:
            w = _unpermute(w, cfg.num_heads if key in ("wq", "bq") else cfg.num_kv_heads)
        layers.setdefault(key, [None] * L)[i] = w.T if w.ndim == 2 else w
    for key, ws in layers.items():
        if any(w is None for w in ws):
            missing = [i for i, w in enumerate(ws) if w is None]
            raise ValueError(f"{path}: tensor {key} missing for layers {missing[:5]}")
    for key in ("attn_norm", "mlp_norm", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        if key not in layers:
            raise ValueError(f"{path}: no layer tensors for {key!r}")
    params = {"embed": get("token_embd.weight"), "final_norm": get("output_norm.weight"),
              "layers": {k: np.stack(v) for k, v in layers.items()}}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = np.ascontiguousarray(get("output.weight").T)
    return cfg, params, tokenizer

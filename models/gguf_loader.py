"""GGUF -> (ModelConfig, storage-layout numpy params, Tokenizer).

Tensor names (llama.cpp) -> Ferry's storage layout (models/config.py; metadata: models/gguf_config.py):
  token_embd -> embed [V, D]; output_norm -> final_norm; output -> lm_head [D, V] (absent: tied)
  blk.N.attn_norm -> attn_norm; blk.N.ffn_norm -> mlp_norm (Gemma: the pre-MLP norm)
  blk.N.{post_attention_norm, post_ffw_norm} -> post_attn_norm, post_mlp_norm          (gemma2/3)
  blk.N.{attn_q, attn_k, attn_v, attn_output} -> wq, wk, wv, wo   ([in, out])
  blk.N.attn_qkv -> wq, wk, wv (split by rows)                                          (phi3)
  blk.N.{attn_q, attn_k, attn_v}.bias -> bq, bk, bv                                      (qwen2)
  blk.N.{attn_q_norm, attn_k_norm} -> q_norm, k_norm                                     (qwen3, gemma3, qwen3moe)
  blk.N.{ffn_gate, ffn_up, ffn_down} -> w_gate, w_up, w_down
  blk.N.ffn_up [2F, D] without ffn_gate -> w_gate (first half), w_up                    (phi3)
  blk.N.ffn_gate_inp [E, D] -> router; blk.N.ffn_{gate,up,down}_exps -> we_gate, we_up, we_down
                                                                           (llama with experts, qwen3moe)
llama.cpp's converter interleaves the rows of q/k for Llama-architecture
models (its RoPE pairs adjacent dims); they are un-permuted back to the HF
"rotate_half" layout that models/llama.py uses. Gemma's norms are stored by
llama.cpp as ``1 + w`` already, which is Ferry's layout too.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ferry.models.config import ModelConfig, RopeScaling
from ferry.models.gguf_config import SUPPORTED_ARCHS, config_from_metadata, model_name  # noqa: F401
from ferry.models.gguf_quants import dequantize
from ferry.models.tokenizer import Tokenizer

_PERMUTED_QK = ("llama", "mistral", "mixtral")
_LAYER = {"attn_norm.weight": "attn_norm", "ffn_norm.weight": "mlp_norm", "attn_q.weight": "wq",
          "attn_k.weight": "wk", "attn_v.weight": "wv", "attn_output.weight": "wo", "attn_q.bias": "bq",
          "attn_k.bias": "bk", "attn_v.bias": "bv", "ffn_gate.weight": "w_gate", "ffn_up.weight": "w_up",
          "ffn_down.weight": "w_down", "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
          "post_attention_norm.weight": "post_attn_norm", "post_ffw_norm.weight": "post_mlp_norm",
          "attn_qkv.weight": "wqkv", "ffn_gate_inp.weight": "router", "ffn_gate_exps.weight": "we_gate",
          "ffn_up_exps.weight": "we_up", "ffn_down_exps.weight": "we_down"}


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


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleave. w: [out, in] with out = n_head * Dh."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _split_fused(cfg: ModelConfig, key: str, w: np.ndarray, has_gate: bool) -> dict[str, np.ndarray]:
    """Phi-3's fused attn_qkv [(Hq + 2 Hkv) Dh, D] and ffn_up [2F, D] (gate rows first) -> separate weights."""
    if key == "wqkv":
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        wq, wk, wv = np.split(w, [q, q + kv], axis=0)
        return {"wq": wq, "wk": wk, "wv": wv}
    if key == "w_up" and not has_gate and not cfg.num_experts and w.shape[0] == 2 * cfg.intermediate_size:
        g, u = np.split(w, 2, axis=0)
        return {"w_gate": g, "w_up": u}
    return {key: w}


def _to_storage(w: np.ndarray) -> np.ndarray:
    """numpy [out, in] -> [in, out]; expert stacks [E, out, in] -> [E, in, out]; vectors unchanged."""
    return w.T if w.ndim == 2 else (w.transpose(0, 2, 1) if w.ndim == 3 else w)


def load_gguf(path: str, progress: bool = False) -> tuple[ModelConfig, dict, Tokenizer]:
    """Read config, tokenizer and f32 params from a GGUF file (ValueError names the problem)."""
    reader = _open(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_metadata(meta, set(tensors), path)
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        f = dequantize(np.asarray(t.data), int(t.tensor_type), (int(t.n_elements),), what=f"{path}: rope_freqs")
        orig = meta.get(f"{meta['general.architecture']}.rope.scaling.original_context_length")
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
        for k, v in _split_fused(cfg, key, w, f"blk.{i}.ffn_gate.weight" in tensors).items():
            layers.setdefault(k, [None] * L)[i] = _to_storage(v)
    for key, ws in layers.items():
        if any(w is None for w in ws):
            missing = [i for i, w in enumerate(ws) if w is None]
            raise ValueError(f"{path}: tensor {key} missing for layers {missing[:5]}")
    mlp = ("router", "we_gate", "we_up", "we_down") if cfg.num_experts else ("w_gate", "w_up", "w_down")
    need = ("attn_norm", "mlp_norm", "wq", "wk", "wv", "wo") + mlp
    need += ("q_norm", "k_norm") if cfg.qk_norm else ()
    need += ("post_attn_norm", "post_mlp_norm") if cfg.sandwich_norm else ()
    for key in need:
        if key not in layers:
            raise ValueError(f"{path}: no layer tensors for {key!r}")
    params = {"embed": get("token_embd.weight"), "final_norm": get("output_norm.weight"),
              "layers": {k: np.stack(v) for k, v in layers.items()}}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = np.ascontiguousarray(get("output.weight").T)
    return cfg, params, tokenizer

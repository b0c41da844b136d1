"""HF directory (config.json + safetensors + tokenizer.json) -> storage-layout numpy params.

Safetensors are parsed directly (8-byte header length, JSON header, raw
little-endian data) so bf16 needs no torch and a truncated file is reported
by name. Single ``model.safetensors`` or sharded ``model.safetensors.index.json``.
HF Linear weights are ``[out, in]`` and are transposed to Ferry's ``[in, out]``.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from ferry.models.config import ModelConfig
from ferry.models.tokenizer import Tokenizer

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8}
_LAYER = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm",
          "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
          "self_attn.o_proj.weight": "wo", "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk",
          "self_attn.v_proj.bias": "bv", "mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up",
          "mlp.down_proj.weight": "w_down"}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one file as numpy arrays (memory-mapped)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: corrupt safetensors header (length {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
    data = np.memmap(path, np.uint8, "r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _DTYPES.get(info.get("dtype"))
        if dt is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        a, b = info["data_offsets"]
        if b > data.size:
            raise ValueError(f"{path}: tensor {name} extends past the end of the file (truncated?)")
        out[name] = np.frombuffer(data[a:b], dtype=dt).reshape(info["shape"])
    return out


def _tensor_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, x) for x in files]
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(x for x in os.listdir(directory) if x.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{directory}: no .safetensors weights")
    return [os.path.join(directory, x) for x in files]


def load_hf_dir(directory: str, progress: bool = False) -> tuple[ModelConfig, dict, Tokenizer]:
    with open(os.path.join(directory, "config.json")) as f:
        try:
            hf = json.load(f)
        except ValueError as e:
            raise ValueError(f"{directory}/config.json: not valid JSON ({e})") from e
    cfg = ModelConfig.from_hf_dict(hf, name=os.path.basename(os.path.normpath(directory)))
    tensors: dict[str, np.ndarray] = {}
    files = _tensor_files(directory)
    if progress:
        from tqdm import tqdm
        files = tqdm(files, desc="reading safetensors", unit="file", leave=False)
    for path in files:
        if not os.path.isfile(path):
            raise ValueError(f"{path}: shard listed in the index is missing")
        tensors.update(read_safetensors(path))

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{directory}: tensor {name!r} is missing")
        return np.asarray(tensors[name])

    L = cfg.num_layers
    layers = {}
    for suffix, key in _LAYER.items():
        if key in ("bq", "bk", "bv") and not cfg.attention_bias:
            continue
        ws = [get(f"model.layers.{i}.{suffix}") for i in range(L)]
        layers[key] = np.stack([w.T if w.ndim == 2 else w for w in ws])
    params = {"embed": get("model.embed_tokens.weight"), "final_norm": get("model.norm.weight"), "layers": layers}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = np.ascontiguousarray(get("lm_head.weight").T)
    tok = Tokenizer.from_dir(directory, eos_token_ids=cfg.eos_token_ids)
    return cfg, params, tok

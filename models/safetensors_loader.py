"""HF directory (config.json + safetensors + tokenizer.json) -> storage-layout numpy params.

Tensors are read with the ``safetensors`` library (``safe_open(..., framework="numpy")``),
single ``model.safetensors`` or sharded ``model.safetensors.index.json``. bf16 needs no
torch: safetensors' numpy backend asks numpy for the dtype named ``"bfloat16"``, which
numpy knows once ``ml_dtypes`` is imported (it is, below); so nothing is parsed here by
hand. What this module adds: the file's name in every error (safetensors' own messages,
e.g. ``MetadataIncompleteBuffer`` for a truncated file, do not say which shard), and the
layout change: HF Linear weights are ``[out, in]`` and are transposed to Ferry's ``[in, out]``
(per-family tensor names, fused-weight splits and expert stacking: models/hf_tensors.py).
"""
from __future__ import annotations

import json
import os

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safetensors' numpy backend looks up)
import numpy as np
from safetensors import SafetensorError, safe_open

from ferry.models.config import ModelConfig
from ferry.models.hf_tensors import GEMMA, gemma_norms_plus_one, hf_layer
from ferry.models.tokenizer import Tokenizer

def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one file as numpy arrays; ValueError naming the file if it is truncated,
    corrupt or holds a dtype numpy cannot represent."""
    try:
        with safe_open(path, framework="numpy") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, TypeError) as e:     # TypeError: a dtype numpy does not know
        kind = "truncated or corrupt safetensors file" if isinstance(e, SafetensorError) else "unsupported tensor"
        raise ValueError(f"{path}: {kind} ({e})") from e


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

    has = tensors.__contains__
    per_layer = [hf_layer(cfg, get, has, f"model.layers.{i}.") for i in range(cfg.num_layers)]
    layers = {k: np.stack([d[k] for d in per_layer]) for k in per_layer[0]}
    params = {"embed": get("model.embed_tokens.weight"), "final_norm": get("model.norm.weight"), "layers": layers}
    if cfg.architecture in GEMMA:                     # Gemma's RMSNorm multiplies by (1 + w)
        params = gemma_norms_plus_one(params)
    if not cfg.tie_word_embeddings:
        params["lm_head"] = np.ascontiguousarray(get("lm_head.weight").T)
    tok = Tokenizer.from_dir(directory, eos_token_ids=cfg.eos_token_ids)
    return cfg, params, tok

"""Ferry checkpoint directories: weights in Orbax, plus config and tokenizer files.

    DIR/ferry_checkpoint.json   marker: format version, dtype, source
    DIR/config.json             ModelConfig.to_json()
    DIR/params/                 Orbax (StandardCheckpointer) pytree of the storage-layout params
    DIR/tokenizer.json, tokenizer_config.json
Arrays are restored exactly as written (bf16 stays bf16), so a round trip is bit-identical.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ferry.models.config import ModelConfig
from ferry.models.tokenizer import Tokenizer

MARKER = "ferry_checkpoint.json"
FORMAT_VERSION = 1


def save_checkpoint(directory: str, cfg: ModelConfig, params: dict, tokenizer: Tokenizer, *, dtype: str,
                    source: str) -> None:
    import orbax.checkpoint as ocp
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(directory, "params"), params, force=True)
    ckpt.wait_until_finished()
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write(cfg.to_json())
    tokenizer.save(directory)
    with open(os.path.join(directory, MARKER), "w") as f:        # written last: marks a complete checkpoint
        json.dump({"format": "ferry", "version": FORMAT_VERSION, "dtype": dtype, "source": source}, f, indent=2)


def load_checkpoint(directory: str) -> tuple[ModelConfig, dict, Tokenizer]:
    import orbax.checkpoint as ocp
    directory = os.path.abspath(directory)
    try:
        with open(os.path.join(directory, MARKER)) as f:
            meta = json.load(f)
        with open(os.path.join(directory, "config.json")) as f:
            cfg = ModelConfig.from_dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{directory}: corrupt Ferry checkpoint metadata ({e})") from e
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format version {meta.get('version')} is not supported")
    try:
        restored = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"))
    except Exception as e:                      # orbax raises many types for missing / damaged files
        raise ValueError(f"{directory}/params: cannot restore Orbax checkpoint ({type(e).__name__}: {e})") from e
    params = _to_numpy(restored)
    return cfg, params, Tokenizer.from_dir(directory, eos_token_ids=cfg.eos_token_ids)


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)

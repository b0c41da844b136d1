"""Checkpoint conversion: GGUF or HF safetensors -> Ferry (Orbax) directory in a chosen dtype."""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def convert(src: str, dst: str, dtype: str = "bfloat16", progress: bool = True, overwrite: bool = False) -> str:
    """Load ``src`` (a .gguf file or an HF directory), cast to ``dtype`` and write ``dst``.

    Refuses a non-empty ``dst`` unless ``overwrite``. Returns ``dst``. Errors
    (missing, corrupt, truncated or unsupported input) are ValueErrors naming
    the file and the problem.
    """
    from ferry.models.orbax_io import save_checkpoint
    from ferry.models.registry import load_model

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)) and not overwrite:
        raise ValueError(f"{dst}: destination exists and is not empty (use overwrite=True / --overwrite)")
    bundle = load_model(src, dtype=None, progress=progress)
    flat = [(k, v) for k, v in bundle.params.items() if k != "layers"] + \
           [(f"layers.{k}", v) for k, v in bundle.params["layers"].items()]
    it = flat
    if progress:
        from tqdm import tqdm
        it = tqdm(flat, desc=f"casting to {dtype}", unit="tensor", leave=False)
    out: dict = {"layers": {}}
    for name, v in it:
        a = np.asarray(v).astype(DTYPES[dtype])
        if name.startswith("layers."):
            out["layers"][name[7:]] = a
        else:
            out[name] = a
    save_checkpoint(dst, bundle.config, out, bundle.tokenizer, dtype=dtype, source=os.path.abspath(src))
    return dst

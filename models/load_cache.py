"""A cache of loaded GGUF models: storage-layout params in one safetensors file, plus
config and tokenizer files.

    ENTRY/params.safetensors    every array, named by its path in the params tree ("layers/wq")
    ENTRY/config.json           ModelConfig.to_json()
    ENTRY/tokenizer.json, tokenizer_config.json
    ENTRY/ferry_cache.json      marker, written last: a complete entry

Reading a GGUF file costs its metadata parse and the dequantization every time (about
5 s for the default SmolLM2 file on the 2-core CPU, most of it gguf-py parsing the
tokenizer's 49k-string arrays). The entry is keyed by the file's absolute path, size and
modification time and by the loaders' source, so an edited file or loader never reads a
stale entry. A damaged entry is rebuilt; a cache that cannot be written (read-only disk) is
skipped with a warning (tests/models/test_load_cache.py).

safetensors rather than Orbax (Ferry's checkpoint format, models/orbax_io.py): the entry
is private and read on every start, and with Orbax importing it alone took 1.5 s and
writing the entry 4.5 s (profiled cold load, 2-core CPU). Side by side with the Orbax cache
(benchmarks/results/model_load_cpu_2core.json): cold loads 1.2x and warm loads 2.0x faster.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil

import numpy as np

log = logging.getLogger("ferry")
MARKER = "ferry_cache.json"
VERSION = 1
_LOADER_SOURCES = ("gguf_loader.py", "gguf_config.py", "gguf_quants.py", "tokenizer.py", "load_cache.py",
                   "config.py")


def cache_key(path: str) -> str:
    st = os.stat(path)
    h = hashlib.sha256(f"{os.path.abspath(path)}\n{st.st_size}\n{st.st_mtime_ns}".encode())
    here = pathlib.Path(__file__).resolve().parent
    for name in _LOADER_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:32]


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.ascontiguousarray(v)
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, a in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = a
    return tree


def save_entry(entry: str, bundle) -> None:
    """Write ``bundle`` (config, storage-layout params, tokenizer) as a cache entry directory."""
    from safetensors.numpy import save_file
    os.makedirs(entry, exist_ok=True)
    flat = _flatten(bundle.params)
    # safetensors' numpy API has no bfloat16: such arrays go in as their uint16 bits
    bf16 = {k for k, a in flat.items() if a.dtype.name == "bfloat16"}
    save_file({k: (a.view(np.uint16) if k in bf16 else a) for k, a in flat.items()},
              os.path.join(entry, "params.safetensors"))
    with open(os.path.join(entry, "config.json"), "w") as f:
        f.write(bundle.config.to_json())
    bundle.tokenizer.save(entry)
    with open(os.path.join(entry, MARKER), "w") as f:
        json.dump({"version": VERSION, "bfloat16": sorted(bf16), "source": bundle.source_path}, f)


def load_entry(entry: str, source: str):
    """The ``ModelBundle`` of a complete entry; ValueError when it is damaged."""
    from safetensors.numpy import load_file
    from ferry.models.bundle import ModelBundle
    from ferry.models.config import ModelConfig
    from ferry.models.tokenizer import Tokenizer
    try:
        with open(os.path.join(entry, MARKER)) as f:
            meta = json.load(f)
        if meta.get("version") != VERSION:
            raise ValueError(f"cache version {meta.get('version')}")
        with open(os.path.join(entry, "config.json")) as f:
            cfg = ModelConfig.from_dict(json.load(f))
        flat = load_file(os.path.join(entry, "params.safetensors"))
    except ValueError:
        raise
    except Exception as e:               # OSError, JSON errors, safetensors' own error types
        raise ValueError(f"{type(e).__name__}: {e}") from e
    if meta.get("bfloat16"):
        import ml_dtypes
        for k in meta["bfloat16"]:
            flat[k] = flat[k].view(ml_dtypes.bfloat16)
    tok = Tokenizer.from_dir(entry, eos_token_ids=cfg.eos_token_ids)
    return ModelBundle(cfg, _unflatten(flat), tok, cfg.name, source)


def load_cached(path: str, cache_dir: str, load):
    """The bundle of ``path``: from the cache entry if there is one, else ``load()`` and store it."""
    entry = os.path.join(cache_dir, cache_key(path))
    if os.path.isfile(os.path.join(entry, MARKER)):
        try:
            return load_entry(entry, path)
        except ValueError as e:
            log.warning("ferry: rebuilding damaged model cache entry %s (%s)", entry, e)
            shutil.rmtree(entry, ignore_errors=True)
    bundle = load()
    tmp = f"{entry}.tmp{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save_entry(tmp, bundle)
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    except OSError as e:
        log.warning("ferry: cannot write the model cache in %s (%s); loading from the file each time", cache_dir, e)
        shutil.rmtree(tmp, ignore_errors=True)
    return bundle

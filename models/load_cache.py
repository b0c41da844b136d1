"""A cache of loaded GGUF models as Ferry checkpoints (models/orbax_io.py).

Reading a GGUF file costs its metadata parse and the dequantization every time
(14 s for the default SmolLM2 Q4_1 file on the 2-core CPU); the checkpoint
loads in 1.0 s. The entry is keyed by the file's absolute path, size and
modification time and by the loaders' source, so an edited file or loader
never reads a stale entry. A damaged entry is rebuilt; a cache that cannot be
written (read-only disk) is skipped with a warning.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil

log = logging.getLogger("ferry")
_LOADER_SOURCES = ("gguf_loader.py", "gguf_config.py", "gguf_quants.py", "tokenizer.py", "orbax_io.py", "config.py")


def cache_key(path: str) -> str:
    st = os.stat(path)
    h = hashlib.sha256(f"{os.path.abspath(path)}\n{st.st_size}\n{st.st_mtime_ns}".encode())
    here = pathlib.Path(__file__).resolve().parent
    for name in _LOADER_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:32]


def load_cached(path: str, cache_dir: str, load):
    """The bundle of ``path``: from the cache entry if there is one, else ``load()`` and store it."""
    from ferry.models.orbax_io import MARKER, load_checkpoint, save_checkpoint
    from ferry.models.bundle import ModelBundle

    entry = os.path.join(cache_dir, cache_key(path))
    if os.path.isfile(os.path.join(entry, MARKER)):
        try:
            cfg, params, tok = load_checkpoint(entry)
            return ModelBundle(cfg, params, tok, cfg.name, path)
        except ValueError as e:
            log.warning("ferry: rebuilding damaged model cache entry %s (%s)", entry, e)
            shutil.rmtree(entry, ignore_errors=True)
    bundle = load()
    tmp = f"{entry}.tmp{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(tmp, bundle.config, bundle.params, bundle.tokenizer, dtype="stored", source=path)
        os.replace(tmp, entry)
    except OSError as e:
        log.warning("ferry: cannot write the model cache in %s (%s); loading from the file each time", cache_dir, e)
        shutil.rmtree(tmp, ignore_errors=True)
    return bundle

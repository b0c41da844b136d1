"""The GGUF load cache (models/load_cache.py): an entry reproduces the parsed model exactly,
is used instead of parsing again, is rebuilt when damaged, and never blocks loading."""
import dataclasses
import logging
import os

import ml_dtypes
import numpy as np
import pytest

from ferry.models.load_cache import MARKER, cache_key, load_cached, load_entry, save_entry
from ferry.models.registry import default_model_path, load_model


@pytest.fixture(scope="module")
def parsed():
    return load_model(None, dtype=None)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _same(a[k], b[k])
        else:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert np.ascontiguousarray(a[k]).tobytes() == np.ascontiguousarray(b[k]).tobytes(), k


def _never():
    raise AssertionError("parsed the GGUF although the cache holds it")


def test_entry_round_trip_is_exact_and_replaces_the_parse(tmp_path, parsed):
    path = default_model_path()
    calls = []
    first = load_cached(path, str(tmp_path), lambda: calls.append(1) or parsed)
    assert calls == [1] and first is parsed
    again = load_cached(path, str(tmp_path), _never)
    _same(parsed.params, again.params)
    assert again.config == parsed.config
    text = "Hello, world! Ferry caches models."
    assert again.tokenizer.encode(text) == parsed.tokenizer.encode(text)
    assert again.tokenizer.eos_token_ids == parsed.tokenizer.eos_token_ids


def test_bfloat16_arrays_survive(tmp_path, parsed):
    params = dict(parsed.params, embed=np.asarray(parsed.params["embed"]).astype(ml_dtypes.bfloat16))
    save_entry(str(tmp_path / "e"), dataclasses.replace(parsed, params=params))
    back = load_entry(str(tmp_path / "e"), "x")
    assert back.params["embed"].dtype == ml_dtypes.bfloat16
    _same(params, back.params)


@pytest.mark.parametrize("damage", ["truncate", "marker", "none"])
def test_damaged_entry_is_rebuilt(tmp_path, parsed, caplog, damage):
    """``none`` is the positive control: an intact entry is read, not rebuilt."""
    path = default_model_path()
    load_cached(path, str(tmp_path), lambda: parsed)
    entry = tmp_path / cache_key(path)
    if damage == "truncate":
        f = entry / "params.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    elif damage == "marker":
        (entry / MARKER).write_text("{not json")
    calls = []
    with caplog.at_level(logging.WARNING, logger="ferry"):
        got = load_cached(path, str(tmp_path), lambda: calls.append(1) or parsed)
    if damage == "none":
        assert calls == [] and "damaged" not in caplog.text
    else:
        assert calls == [1] and "rebuilding damaged model cache entry" in caplog.text
        _same(parsed.params, load_cached(path, str(tmp_path), _never).params)   # rebuilt entry is good
    _same(parsed.params, got.params)


def test_unwritable_cache_dir_warns_and_loads(tmp_path, parsed, caplog):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"            # root ignores permissions: a file where the directory goes
        blocker.write_text("")
        cache = str(blocker / "sub")
    else:
        os.chmod(tmp_path, 0o500)
        cache = str(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ferry"):
        got = load_cached(default_model_path(), cache, lambda: parsed)
    assert got is parsed and "cannot write the model cache" in caplog.text

"""Checkpoint conversion (GGUF / HF safetensors -> Ferry Orbax directory): bit-identical round trips, CLI, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ferry.models.convert import DTYPES, convert
from ferry.models.registry import FERRY_MARKER, default_model_path, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _leaves(params, prefix=""):
    for k, v in params.items():
        yield from (_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_convert_gguf_round_trip_is_bit_identical(tmp_path, dtype, default_bundle):
    dst = str(tmp_path / "ck")
    assert convert(default_model_path(), dst, dtype=dtype, progress=False) == dst
    assert json.load(open(os.path.join(dst, FERRY_MARKER)))["dtype"] == dtype
    back = load_model(dst, dtype=None)
    assert back.config == default_bundle.config and back.name == "SmolLM2-135M-Instruct"
    want = dict(_leaves(default_bundle.params))
    got = dict(_leaves(back.params))
    assert set(got) == set(want)
    for k in ("embed", "final_norm", "layers.wq", "layers.wk", "layers.w_down"):
        w = want[k].astype(DTYPES[dtype])
        assert got[k].dtype == np.dtype(DTYPES[dtype]) and got[k].shape == w.shape
        assert got[k].tobytes() == w.tobytes(), k                             # bit-identical
    tok, ref = back.tokenizer, default_bundle.tokenizer
    assert tok.encode("naïve café 🚀 12345") == ref.encode("naïve café 🚀 12345")
    assert (tok.chat_template, tok.eos_token_ids, tok.bos_token_id) == (ref.chat_template, ref.eos_token_ids,
                                                                        ref.bos_token_id)
    with pytest.raises(ValueError, match="not empty"):
        convert(default_model_path(), dst, dtype=dtype, progress=False)
    up = load_model(dst, dtype="float32")                                     # upcast on load
    assert up.params["layers"]["wq"].dtype == np.float32
    assert np.array_equal(up.params["layers"]["wq"], got["layers.wq"].astype(np.float32))


def _tiny_hf_dir(path, tokenizer, drop=None):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tokenizer.save(str(path))
    if drop:
        f = str(path / "model.safetensors")
        sd = load_file(f)
        del sd[drop]
        save_file(sd, f, metadata={"format": "pt"})


def test_convert_hf_dir_float16_and_cli(tmp_path, default_bundle):
    src = tmp_path / "hf"
    _tiny_hf_dir(src, default_bundle.tokenizer)
    dst = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_checkpoint.py"), str(src), str(dst),
                        "--dtype", "float16"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    orig, back = load_model(str(src)), load_model(str(dst), dtype=None)
    assert back.config == orig.config
    for k, v in _leaves(orig.params):
        assert dict(_leaves(back.params))[k].tobytes() == v.astype(np.float16).tobytes(), k
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_checkpoint.py"), str(src), str(dst)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not empty" in r.stderr                     # refuses to overwrite ...
    convert(str(src), str(dst), dtype="bfloat16", progress=False, overwrite=True)   # ... unless told to
    assert load_model(str(dst), dtype=None).params["embed"].dtype == np.dtype(DTYPES["bfloat16"])


def test_convert_rejects_bad_input(tmp_path, default_bundle):
    missing = tmp_path / "hf_missing"
    _tiny_hf_dir(missing, default_bundle.tokenizer, drop="model.layers.1.mlp.up_proj.weight")
    trunc = tmp_path / "trunc.gguf"
    with open(default_model_path(), "rb") as f:
        trunc.write_bytes(f.read(1_000_000))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    wrong = tmp_path / "model.txt"
    wrong.write_text("hello")
    cases = [(missing, r"hf_missing: tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
             (trunc, "trunc.gguf: corrupt or truncated"), (junk, "junk.gguf: not a GGUF file"),
             (wrong, "model.txt: unknown model format"), (tmp_path / "nope.gguf", "not found: .*nope.gguf")]
    for src, msg in cases:
        with pytest.raises(ValueError, match=msg):
            convert(str(src), str(tmp_path / "dst"), progress=False)
    assert not (tmp_path / "dst").exists()                                   # nothing half-written
    with pytest.raises(ValueError, match="dtype"):
        convert(default_model_path(), str(tmp_path / "dst"), dtype="int8", progress=False)
    ok = tmp_path / "hf_ok"
    _tiny_hf_dir(ok, default_bundle.tokenizer)
    ck = tmp_path / "ck"
    convert(str(ok), str(ck), progress=False)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="ck: corrupt Ferry checkpoint"):
        load_model(str(ck))

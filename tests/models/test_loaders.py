"""Model loading: GGUF dequantization, GGUF and HF safetensors models vs transformers, clear errors for bad files."""
import dataclasses
import os

import gguf
import ml_dtypes
import numpy as np
import pytest

from ferry.models import gguf_quants as q
from ferry.models.registry import default_model_path, load_model
from tests.models.families_util import add_tokenizer


@pytest.mark.parametrize("t", [q.Q8_0, q.Q4_0, q.Q4_1, q.Q4_K, q.Q5_K, q.Q6_K, q.F16, q.BF16, q.F32])
def test_dequantize_matches_gguf_reference(t):
    rng = np.random.default_rng()
    per, nb = q.BLOCK[t]
    shape = (3, per * 2) if per > 1 else (5, 7)
    n = int(np.prod(shape))
    if t == q.F32:
        raw = rng.standard_normal(n).astype(np.float32).view(np.uint8)
    elif t == q.F16:
        raw = rng.standard_normal(n).astype(np.float16).view(np.uint8)
    elif t == q.BF16:
        raw = rng.standard_normal(n).astype(ml_dtypes.bfloat16).view(np.uint8)
    else:
        raw = rng.integers(0, 256, size=n // per * nb, dtype=np.uint8)
        blocks = raw.reshape(-1, nb)
        f16 = lambda x: np.frombuffer(np.float16(x).tobytes(), np.uint8)  # noqa: E731
        scale_at = {q.Q6_K: [208]}.get(t, [0, 2] if t in (q.Q4_1, q.Q4_K, q.Q5_K) else [0])
        for off in scale_at:                                  # sane (finite) f16 scales
            blocks[:, off:off + 2] = f16(rng.uniform(-0.05, 0.05))
    ours = q.dequantize(raw, t, shape)
    ref = gguf.quants.dequantize(raw.reshape(shape[0], -1), gguf.GGMLQuantizationType(t)).reshape(shape)
    np.testing.assert_array_equal(ours, ref)


def test_dequantize_default_model_tensors_match_gguf_reference():
    """One real tensor of each type in the default model's file (the file the speed measurement used)."""
    reader = gguf.GGUFReader(default_model_path(), "r")
    seen = set()
    for t in reader.tensors:
        if int(t.tensor_type) in seen:
            continue
        seen.add(int(t.tensor_type))
        shape = tuple(int(x) for x in reversed(t.shape))
        ours = q.dequantize(np.asarray(t.data), int(t.tensor_type), shape)
        ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref, err_msg=t.name)
    assert {q.Q4_1, q.Q8_0, q.F32} <= seen


def test_dequantize_rejects_truncated_data():
    with pytest.raises(ValueError, match="truncated"):
        q.dequantize(np.zeros(33, np.uint8), q.Q8_0, (32,))
    with pytest.raises(ValueError, match="unsupported"):
        q.dequantize(np.zeros(32, np.uint8), 99, (32,))


def test_default_model_config(default_bundle):
    c = default_bundle.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.eos_token_ids == (2,)
    assert default_bundle.name == "SmolLM2-135M-Instruct"
    assert default_bundle.params["layers"]["wq"].shape == (30, 576, 576)


def _gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows [out, in]: interleave the two rotate_half halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path, model, arch, tok_meta, rope_freqs=None, orig_ctx=None):
    """An HF model written as llama.cpp would: [out, in] numpy tensors, q/k permuted for llama."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_context_length(c.max_position_embeddings)
    if orig_ctx:
        w.add_rope_scaling_orig_ctx_len(orig_ctx)
    add_tokenizer(w, tok_meta)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            for kind in ("weight", "bias"):
                t = sd.get(f"model.layers.{i}.{hf}.{kind}")
                if t is None:
                    continue
                if arch == "llama" and gg in ("attn_q", "attn_k"):
                    t = _gguf_permute(t, c.num_attention_heads if gg == "attn_q" else c.num_key_value_heads)
                w.add_tensor(f"blk.{i}.{gg}.{kind}", t.astype(np.float16) if t.ndim == 2 else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tok_meta():
    from ferry.models.gguf_loader import read_metadata
    reader = gguf.GGUFReader(default_model_path(), "r")
    meta = read_metadata(reader)
    return {k: meta[k] for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}


def _rel_err_vs_hf(bundle, model, ids):
    import torch
    from ferry.models.naive import naive_logits
    ours = np.asarray(naive_logits(bundle.config, bundle.params, ids))
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    return np.linalg.norm(ours - ref) / np.linalg.norm(ref)


def test_tiny_gguf_models_match_transformers(tmp_path, tok_meta):
    """Llama (untied, permuted q/k, Llama-3 rope_freqs, f16 weights) and Qwen2 (bias, tied) GGUFs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ferry.models.config import RopeScaling
    from ferry.models.gguf_loader import llama3_factors
    rs = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    common = dict(vocab_size=len(tok_meta["tokenizer.ggml.tokens"]), hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rope_theta=10000.0, rms_norm_eps=1e-5, eos_token_id=2, bos_token_id=1)
    cases = [("llama", transformers.LlamaForCausalLM(transformers.LlamaConfig(
                 tie_word_embeddings=False, rope_scaling={"rope_type": "llama3", **dataclasses.asdict(rs)},
                 **common)), rs),
             ("qwen2", transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=True, **common)),
              None)]
    for arch, model, scaling in cases:
        torch.manual_seed(0)
        model = model.eval()
        with torch.no_grad():                   # f16-exact weights so the GGUF holds the same values
            for p in model.parameters():
                p.copy_(p.half().float())
        path = tmp_path / f"tiny-{arch}.F16.gguf"
        freqs = llama3_factors(scaling, 16, 10000.0) if scaling else None
        _write_tiny_gguf(path, model, arch, tok_meta, rope_freqs=freqs, orig_ctx=64 if scaling else None)
        b = load_model(str(path))
        assert b.name == f"tiny-{arch}" and b.config.architecture == arch
        assert b.config.rope_scaling == scaling
        assert b.config.attention_bias == (arch == "qwen2") and b.config.tie_word_embeddings == (arch == "qwen2")
        assert ("lm_head" in b.params) == (arch == "llama")
        ids = [5, 77, 1000, 42, 9, 300] * 20            # 120 positions: reaches the scaled rope frequencies
        assert _rel_err_vs_hf(b, model, ids) < 1e-4


def test_bad_model_files_give_clear_errors(tmp_path):
    src = default_model_path()
    trunc = tmp_path / "trunc.gguf"
    with open(src, "rb") as f:
        trunc.write_bytes(f.read(3_000_000))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 100)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    falcon = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(falcon), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cases = [(str(trunc), "trunc.gguf"), (str(junk), "junk.gguf"), (str(other), "unknown model format"),
             (str(tmp_path / "missing.gguf"), "not found"), (str(empty_dir), "not a model directory"),
             (str(falcon), "falcon.gguf: unsupported architecture 'falcon'")]
    for path, msg in cases:
        with pytest.raises(ValueError, match=msg):
            load_model(path)


def test_hf_safetensors_directory_matches_transformers(tmp_path, default_bundle):
    """Llama (untied, Llama-3 rope scaling, sharded) and Qwen2 (bias, tied, single file) HF checkpoints."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    for bias, tied, shard in ((False, False, "300KB"), (True, True, "1GB")):
        cls = transformers.Qwen2ForCausalLM if bias else transformers.LlamaForCausalLM
        ccls = transformers.Qwen2Config if bias else transformers.LlamaConfig
        extra = {} if bias else {"rope_scaling": rope}
        hcfg = ccls(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=tied, rope_theta=10000.0, eos_token_id=2, bos_token_id=1, **extra)
        torch.manual_seed(0)
        model = cls(hcfg).eval()
        d = tmp_path / f"hf_{bias}"
        model.save_pretrained(d, safe_serialization=True, max_shard_size=shard)
        default_bundle.tokenizer.save(str(d))
        assert (d / "model.safetensors.index.json").exists() != bias          # llama sharded, qwen2 single
        b = load_model(str(d))
        assert b.config.attention_bias == bias and b.config.tie_word_embeddings == tied
        assert (b.config.rope_scaling is None) == bias
        assert _rel_err_vs_hf(b, model, [5, 77, 1000, 42, 9, 300] * 20) < 1e-4
    single = d / "model.safetensors"
    single.write_bytes(single.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors: .*(truncated|corrupt)"):
        load_model(str(d))


def test_read_safetensors_dtypes_without_torch_and_errors_name_the_file(tmp_path):
    """The safetensors library reads bf16/f16/f32/int tensors as numpy (bf16 via ml_dtypes, no torch);
    a truncated or corrupt file is a ValueError that names it."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    from ferry.models.safetensors_loader import read_safetensors
    g = torch.Generator().manual_seed(0)
    ref = {"bf16": torch.randn(3, 5, generator=g).bfloat16(), "f16": torch.randn(4, generator=g).half(),
           "f32": torch.randn(2, 2, 2, generator=g), "i64": torch.arange(6).reshape(2, 3)}
    path = tmp_path / "t.safetensors"
    save_file(ref, str(path))
    got = read_safetensors(str(path))
    assert set(got) == set(ref)
    assert got["bf16"].dtype == ml_dtypes.bfloat16 and got["bf16"].shape == (3, 5)
    for k, t in ref.items():
        np.testing.assert_array_equal(got[k].astype(np.float64), t.float().numpy().astype(np.float64), err_msg=k)
    data = path.read_bytes()
    for name, blob in (("cut.safetensors", data[:-8]), ("head.safetensors", data[:5]),
                       ("junk.safetensors", b"\xff" * 64)):
        bad = tmp_path / name
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match=f"{name}: truncated or corrupt"):
            read_safetensors(str(bad))

"""Each model family vs HF transformers (f32) on a random SMALL model built from its config class.

Per family: the HF directory (config.json + safetensors + tokenizer) and a GGUF written as
llama.cpp's converter would, each loaded by Ferry: greedy tokens of the paged model identical
to transformers' ``generate`` on a prompt longer than the sliding window, last-position
logits within 1e-4 relative (the naive full-recompute oracle too), and each family feature
switched off changes the logits (so the test really exercises it).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.models import families_util as fu

pytest.importorskip("torch")
pytest.importorskip("transformers")

FAMILIES = list(fu.FAMILIES)
# features that must matter on these test models: switching one off moves the logits by > 1e-3
ABLATIONS = {
    "qwen3": [{"qk_norm": False}],
    "mistral": [{"sliding_window": None}],
    "gemma2": [{"sliding_window": None}, {"attn_logit_softcap": None}, {"final_logit_softcap": None},
               {"attn_scale": None}, {"scale_embeddings": False}, {"sandwich_norm": False},
               {"hidden_act": "silu"}],
    "gemma3": [{"sliding_window": None}, {"rope_local_theta": None}, {"rope_scaling": None}, {"qk_norm": False}],
    "phi3": [{"sliding_window": None}],
    "qwen3moe": [{"norm_topk_prob": True}, {"num_experts_per_tok": 1}],
    "mixtral": [{"num_experts_per_tok": 1}],
}


@pytest.fixture(scope="module")
def tok():
    from ferry.models.tokenizer import Tokenizer
    meta = fu.tokenizer_meta()
    return meta, Tokenizer.from_gguf_metadata(meta, what="default model"), len(meta["tokenizer.ggml.tokens"])


def _check(bundle, model, family, ids):
    from ferry.models.naive import naive_logits
    ref_tokens, ref_last = fu.hf_greedy(model, ids)
    tokens, last = fu.ferry_greedy(bundle.config, bundle.params, ids)
    assert len(set(ref_tokens)) > 2, ref_tokens                          # non-degenerate model
    assert tokens == ref_tokens, family
    assert fu.rel_err(last, ref_last) < 1e-4
    assert fu.rel_err(np.asarray(naive_logits(bundle.config, bundle.params, ids))[-1], ref_last) < 1e-4
    return ref_last


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_dir_matches_transformers(family, tmp_path, tok):
    from ferry.models.naive import naive_logits
    from ferry.models.registry import load_model
    meta, tokenizer, V = tok
    model = fu.build_hf(family, V)
    b = load_model(fu.save_hf(model, tmp_path / family, tokenizer))
    assert b.config.architecture == family
    ids = fu.prompt(1, V)
    assert len(ids) > (b.config.sliding_window or 0)
    ref_last = _check(b, model, family, ids)
    for off in ABLATIONS.get(family, []):
        got = np.asarray(naive_logits(dataclasses.replace(b.config, **off), b.params, ids))[-1]
        assert fu.rel_err(got, ref_last) > 1e-3, off


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_matches_transformers(family, tmp_path, tok):
    from ferry.models.registry import load_model
    meta, _, V = tok
    model = fu.build_hf(family, V, gguf=True)
    b = load_model(fu.write_gguf(tmp_path / f"tiny-{family}.F32.gguf", model, family, meta))
    want = {"mistral": "llama"}.get(family, family)          # llama.cpp writes Mistral as "llama"
    assert b.config.architecture == want and b.name == f"tiny-{family}"
    _check(b, model, family, fu.prompt(2, V))


@pytest.mark.parametrize("family", ["gemma3", "qwen3moe"])
def test_convert_round_trip_keeps_family_features(family, tmp_path, tok):
    """``ferry convert`` of an HF directory: config (layer types, rope per layer type, experts) and
    weights (4-D expert stacks, Gemma norms) survive the Ferry checkpoint."""
    from ferry.models.convert import convert
    from ferry.models.registry import load_model
    _, tokenizer, V = tok
    model = fu.build_hf(family, V)
    src = load_model(fu.save_hf(model, tmp_path / family, tokenizer))
    back = load_model(convert(fu.save_hf(model, tmp_path / "hf", tokenizer), str(tmp_path / "ck"),
                              dtype="float32", progress=False))
    assert dataclasses.replace(back.config, name=src.config.name) == src.config
    ids = fu.prompt(3, V)
    assert fu.ferry_greedy(back.config, back.params, ids)[0] == fu.hf_greedy(model, ids)[0]


def test_unsupported_architectures_are_clear_errors():
    from ferry.models.config import ModelConfig
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match="unsupported architecture 'FalconForCausalLM'"):
        ModelConfig.from_hf_dict({**base, "architectures": ["FalconForCausalLM"]})
    with pytest.raises(ValueError, match="longrope"):
        ModelConfig.from_hf_dict({**base, "architectures": ["Phi3ForCausalLM"],
                                  "rope_scaling": {"rope_type": "longrope", "long_factor": [1.0]}})
    with pytest.raises(ValueError, match="mlp_only_layers"):
        ModelConfig.from_hf_dict({**base, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4,
                                  "num_experts_per_tok": 2, "moe_intermediate_size": 8, "mlp_only_layers": [0]})


# Abridged config.json files of real Hub checkpoints (older layout: rope_theta, rope_scaling,
# rope_local_base_freq, sliding_window_pattern, no layer_types).
HUB = {
    "gemma-2-2b-it": dict(architectures=["Gemma2ForCausalLM"], attn_logit_softcapping=50.0,
                          final_logit_softcapping=30.0, head_dim=256, hidden_act="gelu_pytorch_tanh",
                          hidden_activation="gelu_pytorch_tanh", hidden_size=2304, intermediate_size=9216,
                          max_position_embeddings=8192, num_attention_heads=8, num_hidden_layers=26,
                          num_key_value_heads=4, query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                          sliding_window=4096, vocab_size=256000, eos_token_id=[1, 107], bos_token_id=2),
    "gemma-3-1b-it": dict(architectures=["Gemma3ForCausalLM"], head_dim=256, hidden_size=1152,
                          intermediate_size=6912, num_attention_heads=4, num_hidden_layers=26, num_key_value_heads=1,
                          query_pre_attn_scalar=256, rope_local_base_freq=10000, rope_scaling=None,
                          rope_theta=1000000, sliding_window=512, sliding_window_pattern=6, vocab_size=262144,
                          max_position_embeddings=32768, hidden_activation="gelu_pytorch_tanh"),
    "gemma-3-4b-text": dict(architectures=["Gemma3ForCausalLM"], head_dim=256, hidden_size=2560,
                            intermediate_size=10240, num_attention_heads=8, num_hidden_layers=34,
                            num_key_value_heads=4, query_pre_attn_scalar=256, rope_local_base_freq=10000.0,
                            rope_scaling={"factor": 8.0, "rope_type": "linear"}, rope_theta=1000000.0,
                            sliding_window=1024, sliding_window_pattern=6, vocab_size=262208,
                            max_position_embeddings=131072, hidden_activation="gelu_pytorch_tanh"),
    "Qwen3-30B-A3B": dict(architectures=["Qwen3MoeForCausalLM"], num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          head_dim=128, hidden_size=2048, intermediate_size=6144, num_attention_heads=32,
                          num_key_value_heads=4, num_hidden_layers=48, rope_theta=1000000.0, sliding_window=None,
                          use_sliding_window=False, max_window_layers=48, vocab_size=151936, rms_norm_eps=1e-6,
                          max_position_embeddings=40960, tie_word_embeddings=False),
    "Qwen2.5-7B-Instruct": dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944,
                                num_attention_heads=28, num_hidden_layers=28, num_key_value_heads=4,
                                rope_theta=1000000.0, sliding_window=131072, use_sliding_window=False,
                                max_window_layers=28, vocab_size=152064, tie_word_embeddings=False,
                                rms_norm_eps=1e-6, max_position_embeddings=32768),
    "Mistral-7B-v0.1": dict(architectures=["MistralForCausalLM"], hidden_size=4096, intermediate_size=14336,
                            num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8, rope_theta=10000.0,
                            sliding_window=4096, vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=32768),
    "Phi-3-mini-4k-instruct": dict(architectures=["Phi3ForCausalLM"], hidden_size=3072, intermediate_size=8192,
                                   num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=32,
                                   rope_scaling=None, rope_theta=10000.0, sliding_window=2047, vocab_size=32064,
                                   original_max_position_embeddings=4096, pad_token_id=32000, rms_norm_eps=1e-5,
                                   max_position_embeddings=4096),
    "Mixtral-8x7B-v0.1": dict(architectures=["MixtralForCausalLM"], hidden_size=4096, intermediate_size=14336,
                              num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8,
                              num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, sliding_window=None,
                              rms_norm_eps=1e-5, max_position_embeddings=32768, vocab_size=32000),
}


@pytest.mark.parametrize("name", list(HUB))
def test_hub_config_layouts_agree(name):
    """A Hub config.json and transformers 5's re-serialisation of it (rope_parameters, layer_types)
    give the same ModelConfig."""
    import transformers
    from ferry.models.config import ModelConfig
    from ferry.models.hf_config import FAMILIES as HF_FAMILIES
    hub = HUB[name]
    arch = hub["architectures"][0]
    cls = getattr(transformers, arch.replace("ForCausalLM", "TextConfig" if "Gemma3" in arch else "Config"))
    t5 = {**cls(**hub).to_dict(), "architectures": [arch]}
    ours = ModelConfig.from_hf_dict(hub, name)
    no_ids = dict(bos_token_id=None, eos_token_ids=())              # transformers fills in its defaults
    t5_cfg = ModelConfig.from_hf_dict(t5, name)
    assert dataclasses.replace(t5_cfg, **no_ids) == dataclasses.replace(ours, **no_ids)
    assert ours.architecture == HF_FAMILIES[arch]
    c, L = ours, ours.num_layers
    windows = [c.window(i) for i in range(L)]
    if name.startswith("gemma-2"):
        assert windows[:2] == [4096, None] and c.attn_scale == 256 ** -0.5 and c.final_logit_softcap == 30.0
    elif name.startswith("gemma-3"):
        assert [i for i, w in enumerate(windows) if w is None] == list(range(5, L, 6))
        assert c.rope_local_theta == 10000.0 and c.qk_norm and c.tie_word_embeddings
        assert (c.rope_scaling is None) == (name == "gemma-3-1b-it")
    elif name.startswith("Qwen"):
        assert windows == [None] * L
    elif name.startswith(("Mistral", "Phi")):
        assert windows == [c.sliding_window] * L and c.sliding_window in (4096, 2047)
    if name.startswith("Qwen3-30B"):
        assert (c.num_experts, c.num_experts_per_tok, c.intermediate_size, c.norm_topk_prob) == (128, 8, 768, True)

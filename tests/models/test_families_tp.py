"""Tensor parallel 2 (two of the 8 host CPU devices tests/conftest.py fakes) gives the same greedy
tokens as one device and as HF, for a family of each kind: q/k norms, sliding window + soft-caps,
routed experts sharded over "tp" (Mixtral 4 experts, Qwen3-MoE 8 experts: 2 and 4 per device)."""
from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from tests.models import families_util as fu

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok():
    from ferry.models.tokenizer import Tokenizer
    meta = fu.tokenizer_meta()
    return Tokenizer.from_gguf_metadata(meta, what="default model"), len(meta["tokenizer.ggml.tokens"])


@pytest.mark.skipif(jax.device_count() < 2, reason="needs --xla_force_host_platform_device_count >= 2")
@pytest.mark.parametrize("family", ["qwen3", "gemma2", "mixtral", "qwen3moe"])
def test_tp2_matches_single_device_and_hf(family, tmp_path, tok):
    from ferry.engine import sharding as tp
    from ferry.models.llama import runtime_params
    from ferry.models.registry import load_model
    tokenizer, V = tok
    model = fu.build_hf(family, V)
    b = load_model(fu.save_hf(model, tmp_path / family, tokenizer))
    cfg = b.config
    assert tp.head_layout(cfg.num_heads, cfg.num_kv_heads, 2).is_identity
    if cfg.num_experts:
        spec = tp.param_specs(runtime_params(b.params), cfg, 2)["layer_0"]
        assert spec["we_gate"] == spec["we_down"] == P("tp", None, None) and spec["router"] == P()
    ids = fu.prompt(4, V)
    one, last1 = fu.ferry_greedy(cfg, b.params, ids)
    two, last2 = fu.ferry_greedy(cfg, b.params, ids, mesh=tp.make_mesh(2))
    assert two == one == fu.hf_greedy(model, ids)[0]
    assert fu.rel_err(last2, last1) < 1e-5

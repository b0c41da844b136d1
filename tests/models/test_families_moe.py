"""MoE routing and expert compute vs HF, layer by layer, on the inputs HF's own MoE blocks saw.

For Mixtral (softmax, top-2, always renormalised) and Qwen3-MoE (softmax, top-k, renormalised
only with ``norm_topk_prob``; both settings): each token's chosen experts equal HF's router
choices exactly and in order, their weights agree, and Ferry's ragged_dot block output equals
HF's sparse MoE block output.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tests.models import families_util as fu

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok():
    from ferry.models.tokenizer import Tokenizer
    meta = fu.tokenizer_meta()
    return Tokenizer.from_gguf_metadata(meta, what="default model"), len(meta["tokenizer.ggml.tokens"])


@pytest.mark.parametrize("family,renorm", [("mixtral", True), ("qwen3moe", False), ("qwen3moe", True)])
def test_routing_and_experts_match_hf_layer_by_layer(family, renorm, tmp_path, tok):
    from ferry.models.llama import runtime_params
    from ferry.models.moe import moe_mlp, route
    from ferry.models.registry import load_model
    tokenizer, V = tok
    model = fu.build_hf(family, V)
    if family == "qwen3moe":
        model.config.norm_topk_prob = renorm
        for layer in model.model.layers:
            layer.mlp.gate.norm_topk_prob = renorm
    b = load_model(fu.save_hf(model, tmp_path / family, tokenizer))
    cfg = b.config
    assert cfg.norm_topk_prob == renorm and cfg.num_experts == len(model.model.layers[0].mlp.experts.gate_up_proj)
    seen: dict = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.register_forward_hook(
            lambda m, args, out, i=i: seen.__setitem__(("block", i), (args[0][0].numpy(), out[0].numpy()))))
        hooks.append(layer.mlp.gate.register_forward_hook(
            lambda m, args, out, i=i: seen.__setitem__(("gate", i), (out[1].numpy(), out[2].numpy()))))
    with torch.inference_mode():
        model(torch.tensor([fu.prompt(5, V, 48)]))
    for h in hooks:
        h.remove()
    rt = runtime_params(b.params)
    used = set()
    for i in range(cfg.num_layers):
        x, ref_out = seen[("block", i)]
        ref_w, ref_e = seen[("gate", i)]
        p = rt[f"layer_{i}"]
        w, e = route(jnp.asarray(x), jnp.asarray(p["router"]), cfg.num_experts_per_tok, cfg.norm_topk_prob)
        np.testing.assert_array_equal(np.asarray(e), ref_e)                 # expert by expert, in order
        np.testing.assert_allclose(np.asarray(w), ref_w, rtol=1e-5, atol=1e-6)
        used |= set(np.asarray(e).ravel().tolist())
        out = moe_mlp(cfg, jnp.asarray(x), *(jnp.asarray(p[k]) for k in ("router", "we_gate", "we_up", "we_down")))
        assert fu.rel_err(out, ref_out) < 1e-5
    assert used == set(range(cfg.num_experts))                             # every expert exercised
    if not renorm:                                                         # the flag matters here
        w2, _ = route(jnp.asarray(x), jnp.asarray(p["router"]), cfg.num_experts_per_tok, True)
        assert not np.allclose(np.asarray(w2), ref_w, atol=1e-3)

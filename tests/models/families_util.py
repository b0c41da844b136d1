"""Helpers of the family parity tests (tests/models/test_families*.py); not collected by pytest.

``build_hf(family, dir, tokenizer)`` makes a random SMALL transformers model from the
family's config class (no download) and saves it as an HF directory with a tokenizer;
``write_gguf`` writes the same weights as llama.cpp's converter would; ``hf_greedy`` and
``ferry_greedy`` generate greedily (HF f32 ``generate`` / Ferry's paged model over
``one_request_meta``) and return the tokens and the last prompt position's logits.
"""
from __future__ import annotations

import numpy as np

VOCAB_SOURCE = "tokenizer.ggml"
WINDOW = 8            # sliding window of the windowed families; prompts are longer (PROMPT_LEN)
PROMPT_LEN, N_NEW = 40, 12
S, PAGES = 4, 16      # page size, pages of the one request (64 slots >= PROMPT_LEN + N_NEW)

_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, eos_token_id=2,
               bos_token_id=1, pad_token_id=0, initializer_range=0.1, rms_norm_eps=1e-6)
_SL, _FU = "sliding_attention", "full_attention"

# family -> (transformers config class, model class, config kwargs, GGUF arch, HF kwargs that GGUF cannot hold
#            replaced for the GGUF variant)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True), "qwen2", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False), "qwen3", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW), "llama", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
                    final_logit_softcapping=3.0), "gemma2", dict(query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(sliding_window=WINDOW, query_pre_attn_scalar=24, layer_types=[_SL, _FU, _SL, _FU],
                    rope_parameters={_FU: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                     _SL: {"rope_type": "default", "rope_theta": 1e4}}),
               "gemma3", dict(query_pre_attn_scalar=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=WINDOW), "phi3", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2),
                "llama", {}),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                 dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False),
                 "qwen3moe", {}),
}


def hf_config(family: str, vocab: int, gguf: bool = False):
    import transformers
    cname, _, kw, _, gg = FAMILIES[family]
    kw = {**_COMMON, **kw, **(gg if gguf else {}), "vocab_size": vocab}
    return getattr(transformers, cname)(**kw)


def build_hf(family: str, vocab: int, seed: int = 0, gguf: bool = False):
    """A random f32 HF model of ``family``; norm weights perturbed so Gemma's ``1 + w`` matters."""
    import torch
    import transformers
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family][1])(hf_config(family, vocab, gguf)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    model.generation_config.eos_token_id = None           # generate exactly N_NEW tokens
    return model


def save_hf(model, directory, tokenizer) -> str:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save(str(directory))
    return str(directory)


def prompt(seed: int, vocab: int, n: int = PROMPT_LEN) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


def hf_greedy(model, ids: list[int], n: int = N_NEW) -> tuple[list[int], np.ndarray]:
    """(greedy tokens of HF ``generate`` in f32, logits f32[V] at the last prompt position)."""
    import torch
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(x),
                             pad_token_id=0)
        last = model(x).logits[0, -1].float().numpy()
    return out[0, len(ids):].tolist(), last


def ferry_greedy(cfg, storage_params, ids: list[int], n: int = N_NEW, mesh=None) -> tuple[list[int], np.ndarray]:
    """Greedy tokens of Ferry's paged model (prefill in one chunk, then one-token decode rows) and
    the last prompt position's logits; ``mesh`` shards weights and KV pages as the engine does."""
    import jax
    import jax.numpy as jnp
    from ferry.models.attention import one_request_meta
    from ferry.models.llama import Llama, logits, runtime_params
    params = runtime_params(storage_params)
    kc = jnp.zeros((cfg.num_layers, cfg.num_kv_heads, PAGES + 1, S, cfg.head_dim), jnp.float32)
    if mesh is not None:
        from jax.sharding import NamedSharding
        from ferry.engine import sharding as tp
        params = tp.shard_params(params, tp.param_specs(params, cfg, mesh.size), mesh, jnp.float32)
        kc = jax.device_put(kc, NamedSharding(mesh, tp.KV_SPEC))
    else:
        params = jax.tree.map(jnp.asarray, params)
    vc = kc
    model = Llama(cfg, attn_impl="reference", mesh=mesh)

    @jax.jit
    def step(params, tok, pos, kc, vc, meta):
        h, kc, vc = model.apply({"params": params}, tok, pos, kc, vc, meta)
        return logits(cfg, params, h[-1:])[0], kc, vc

    pages = np.arange(1, PAGES + 1, dtype=np.int32)
    pos = np.arange(len(ids), dtype=np.int32)
    lg, kc, vc = step(params, jnp.asarray(ids, jnp.int32), pos, kc, vc, one_request_meta(pos, pages, S))
    last = np.asarray(lg)
    out = []
    for t in range(len(ids), len(ids) + n):
        out.append(int(jnp.argmax(lg)))
        if len(out) == n:
            break
        p1 = np.array([t], np.int32)
        lg, kc, vc = step(params, jnp.asarray(out[-1:], jnp.int32), p1, kc, vc, one_request_meta(p1, pages, S))
    return out, last


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


# ------------------------------------------------------------------------------------------ GGUF
_GG = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
       "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv", "self_attn.q_norm": "attn_q_norm",
       "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
       "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
       "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp",
       "block_sparse_moe.gate": "ffn_gate_inp"}
_GG_GEMMA = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row interleave for Llama-architecture GGUFs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, family: str, tok_meta: dict) -> str:
    """Write ``model`` as llama.cpp's convert_hf_to_gguf.py would (f32 tensors, numpy [out, in])."""
    import gguf
    c = model.config
    arch = FAMILIES[family][3]
    gemma = family.startswith("gemma")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_context_length(c.max_position_embeddings)
    rp = c.rope_parameters
    if "full_attention" in rp:                                     # Gemma 3: global layers' rope
        rp = rp["full_attention"]
        if rp.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rp["factor"])
    w.add_rope_freq_base(float(rp["rope_theta"]))
    ne = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    if ne:
        w.add_expert_count(ne)
        w.add_expert_used_count(c.num_experts_per_tok)
        if family == "qwen3moe":
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
            w.add_expert_weights_norm(bool(c.norm_topk_prob))
    w.add_feed_forward_length(c.intermediate_size)
    if getattr(c, "sliding_window", None):
        w.add_sliding_window(c.sliding_window)
        if family == "gemma3":
            w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
    if family == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    add_tokenizer(w, tok_meta)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    plus = (lambda name, t: t + 1.0 if gemma and name.endswith("norm.weight") else t)  # noqa: E731
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", plus("model.norm.weight", sd["model.norm.weight"]))
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {**_GG, **(_GG_GEMMA if gemma else {})}
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}."
        for hf, gg in names.items():
            for kind in ("weight", "bias"):
                t = sd.get(f"{pre}{hf}.{kind}")
                if t is None:
                    continue
                if arch == "llama" and gg in ("attn_q", "attn_k"):
                    t = _permute(t, c.num_attention_heads if gg == "attn_q" else c.num_key_value_heads)
                w.add_tensor(f"blk.{i}.{gg}.{kind}", plus(hf + ".weight", t))
        if ne:                                                      # experts stacked: [E, out, in]
            base, ns = ((pre + "block_sparse_moe.experts.", ("w1", "w3", "w2")) if family == "mixtral"
                        else (pre + "mlp.experts.", ("gate_proj", "up_proj", "down_proj")))
            if f"{base}0.{ns[0]}.weight" not in sd:                 # transformers 5 fused experts
                gu, dn = sd[pre + "mlp.experts.gate_up_proj"], sd[pre + "mlp.experts.down_proj"]
                F = gu.shape[1] // 2
                stacks = (gu[:, :F], gu[:, F:], dn)
            else:
                stacks = [np.stack([sd[f"{base}{e}.{n}.weight"] for e in range(ne)]) for n in ns]
            for gg, t in zip(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"), stacks):
                w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def add_tokenizer(w, tok_meta: dict) -> None:
    """The default model's GPT-2-style tokenizer (``tokenizer_meta()``) into GGUF writer ``w``."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tok_meta["tokenizer.ggml.tokens"])
    w.add_token_merges(tok_meta["tokenizer.ggml.merges"])
    w.add_token_types(tok_meta["tokenizer.ggml.token_type"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def tokenizer_meta() -> dict:
    """The default model's GGUF tokenizer (SmolLM2 BPE, 49152 tokens), for HF dirs and GGUFs."""
    import gguf
    from ferry.models.gguf_loader import read_metadata
    from ferry.models.registry import default_model_path
    meta = read_metadata(gguf.GGUFReader(default_model_path(), "r"))
    return {k: v for k, v in meta.items() if k.startswith(VOCAB_SOURCE)}

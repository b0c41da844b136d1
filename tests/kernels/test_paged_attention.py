"""Pallas decode paged attention (interpret mode) against the pure-JAX reference, fresh random inputs.

Outputs are poisoned: Pallas interpret mode fills every output buffer with NaN before the kernel
runs (checked by test_interpret_mode_poisons_outputs), so an element the kernel forgot to write
fails the comparison.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferry.kernels.paged_attention import paged_attention_reference
from jax.experimental import pallas as pl

from ferry.kernels.paged_attention_pallas import default_splits, paged_attention


def _seed():
    return int(np.random.SeedSequence().entropy % 2**31)


def _case(rng, B, Hq, Hkv, Dh, S, P_max, L=2, dtype=jnp.float32):
    P = B * P_max + 1
    k = rng.standard_normal((L, Hkv, P, S, Dh)).astype(np.float32)
    v = rng.standard_normal((L, Hkv, P, S, Dh)).astype(np.float32)
    lens = rng.integers(1, P_max * S + 1, size=B)
    lens[rng.random(B) < 0.25] = 0                                     # padding rows
    if B > 1:
        lens[0] = P_max * S                                            # full table
    tables = np.zeros((B, P_max), np.int32)                            # null-page padded
    perm = rng.permutation(np.arange(1, P))                            # shuffled pages
    for b in range(B):
        n = -(-int(lens[b]) // S)
        tables[b, :n] = perm[b * P_max:b * P_max + n]
        # slots past seq_len inside the last page hold garbage (NaN): must never leak
        if n:
            last = tables[b, n - 1]
            off = int(lens[b]) - (n - 1) * S
            k[:, :, last, off:] = np.nan
            v[:, :, last, off:] = np.nan
    q = rng.standard_normal((B, Hq, Dh)).astype(np.float32)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), jnp.asarray(tables), jnp.asarray(lens.astype(np.int32))


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (9, 3), (8, 2), (16, 2)])   # GQA ratios 1, 3, 4, 8
@pytest.mark.parametrize("S", [16, 32])
def test_matches_reference_f32(Hq, Hkv, S):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    q, k, v, bt, lens = _case(rng, B=5, Hq=Hq, Hkv=Hkv, Dh=32, S=S, P_max=4)
    for layer in (0, 1):
        ref = paged_attention_reference(q, k, v, layer, bt, lens, scale=0.17)
        for splits, ppb in ((1, 1), (3, 1), (2, 2), (1, 4)):              # split-K off/on, pages per block
            got = paged_attention(q, k, v, layer, bt, lens, scale=0.17, num_splits=splits, pages_per_block=ppb,
                                  interpret=True)
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5,
                                       err_msg=f"seed={seed} layer={layer} splits={splits} ppb={ppb}")
    assert np.all(np.asarray(got)[np.asarray(lens) == 0] == 0)           # padding rows output zeros


def test_bf16_soft_cap_and_large_page():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    q, k, v, bt, lens = _case(rng, B=3, Hq=8, Hkv=2, Dh=64, S=128, P_max=2, dtype=jnp.bfloat16)
    ref = paged_attention_reference(q, k, v, 1, bt, lens, scale=0.125, soft_cap=30.0)
    got = paged_attention(q, k, v, 1, bt, lens, scale=0.125, soft_cap=30.0, num_splits=2, interpret=True)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2,
                               err_msg=f"seed={seed}")


@pytest.mark.parametrize("Dh,dtype", [(80, jnp.float32), (96, jnp.bfloat16), (100, jnp.float32)])
def test_head_dim_not_a_power_of_two(Dh, dtype):
    """Triton tiles are powers of two: q is zero-padded to pow2(Dh) lanes, K/V lanes >= Dh are clamped
    loads (NaN past each row's length), the padded lanes of the partial accumulators are dropped."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    q, k, v, bt, lens = _case(rng, B=5, Hq=6, Hkv=2, Dh=Dh, S=16, P_max=4, dtype=dtype)
    ref = paged_attention_reference(q, k, v, 1, bt, lens, scale=0.1)
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    for splits, ppb in ((1, 1), (2, 2)):
        got = paged_attention(q, k, v, 1, bt, lens, scale=0.1, num_splits=splits, pages_per_block=ppb,
                              interpret=True)
        assert got.shape == q.shape and got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol,
                                   err_msg=f"seed={seed} splits={splits} ppb={ppb}")
    assert np.all(np.asarray(got, np.float32)[np.asarray(lens) == 0] == 0)


def test_every_length_from_1_to_max():
    """One row per length 1..P_max*S (exact page multiples included), shuffled tables, both variants."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    S, P_max = 16, 3
    q, k, v, bt, _ = _case(rng, B=P_max * S, Hq=8, Hkv=2, Dh=16, S=S, P_max=P_max)
    lens = jnp.arange(1, P_max * S + 1, dtype=jnp.int32)
    ref = paged_attention_reference(q, k, v, 0, bt, lens, scale=0.3)
    for kw in ({"num_splits": 2, "pages_per_block": 1}, {"backend": "tpu"}):
        got = paged_attention(q, k, v, 0, bt, lens, scale=0.3, interpret=True, **kw)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5, err_msg=f"seed={seed} {kw}")


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (9, 3), (16, 2)])
def test_tpu_variant_matches_reference(Hq, Hkv):
    """Mosaic TPU variant (scalar-prefetched block tables), run in interpret mode on CPU."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    q, k, v, bt, lens = _case(rng, B=4, Hq=Hq, Hkv=Hkv, Dh=32, S=16, P_max=3)
    ref = paged_attention_reference(q, k, v, 1, bt, lens, scale=0.2, soft_cap=4.0)
    got = paged_attention(q, k, v, 1, bt, lens, scale=0.2, soft_cap=4.0, backend="tpu", interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5, err_msg=f"seed={seed}")
    assert np.all(np.asarray(got)[np.asarray(lens) == 0] == 0)


def test_interpret_mode_poisons_outputs():
    """The poisoning the other tests rely on: an unwritten Pallas output reads back as NaN."""
    def kernel(x_ref, o_ref):
        o_ref[0] = x_ref[0]
    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((4,), jnp.float32), interpret=True)(jnp.ones(4))
    assert float(out[0]) == 1.0 and np.isnan(np.asarray(out[1:])).all()


def test_default_splits_and_bad_input():
    assert default_splits(1, 8, 64) > 1                                  # small batch, long context: split
    assert default_splits(128, 8, 16) == 1                               # big batch: one program per row
    q, k, v, bt, lens = _case(np.random.default_rng(0), B=2, Hq=6, Hkv=2, Dh=16, S=16, P_max=2)
    with pytest.raises(ValueError):
        paged_attention(q[:, :5], k, v, 0, bt, lens, scale=1.0, interpret=True)   # Hq not a multiple of Hkv
    with pytest.raises(ValueError):
        paged_attention(q, k, v, 0, bt[:1], lens, scale=1.0, interpret=True)


def test_engine_decode_step_with_pallas_kernels_matches_reference():
    """The jitted decode step with Pallas attention + Pallas compaction (interpret on CPU) gives the
    same tokens as the reference path, under the compile guard."""
    from ferry.engine.config import EngineConfig
    from ferry.engine.llm_engine import LLMEngine
    from ferry.engine.sampling_params import SamplingParams
    outs = {}
    for impl in ("reference", "pallas"):
        eng = LLMEngine(EngineConfig(model="random:tiny-gqa3", max_batch=2, max_model_len=64, max_prefill_chunk=16,
                                     num_pages=12, attn_impl=impl, strict_compile_guard=True,
                                     warmup_progress=False, compile_cache_dir=None))
        for i, ids in enumerate(([5, 9, 14, 200], [7] * 19)):
            eng.add_request(str(i), ids, SamplingParams(temperature=0, max_tokens=6 + i, ignore_eos=True))
        res = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    res[o.request_id] = (o.token_ids, o.finish_reason)
        outs[impl] = res
    assert outs["pallas"] == outs["reference"]

"""Pallas prefill attention over pages (interpret mode) against the pure-JAX reference, fresh random inputs.

Pallas interpret mode fills every output with NaN before the kernel runs (checked in
tests/kernels/test_paged_attention.py), so an output element the kernel forgot to write fails here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferry.kernels.prefill_attention import prefill_attention_reference, write_kv
from ferry.kernels.prefill_attention_pallas import prefill_attention


def _seed():
    return int(np.random.SeedSequence().entropy % 2**31)


def _chunk_case(rng, T, n_real, start, Hq, Hkv, Dh, S, P_max, L=2, dtype=jnp.float32):
    """A request whose tokens 0..start-1 are cached and whose chunk holds n_real tokens from `start`
    (the rest of the T rows are padding). Pages are a shuffled subset; unused slots hold NaN."""
    P = P_max + 3
    k = np.full((L, Hkv, P, S, Dh), np.nan, np.float32)              # stale garbage everywhere
    v = np.full((L, Hkv, P, S, Dh), np.nan, np.float32)
    table = np.zeros(P_max, np.int32)                                  # null-page padded
    n_pages = -(-(start + n_real) // S)
    table[:n_pages] = rng.permutation(np.arange(1, P))[:n_pages]
    for t in range(start):                                             # earlier chunks already cached
        k[:, :, table[t // S], t % S] = rng.standard_normal((L, Hkv, Dh))
        v[:, :, table[t // S], t % S] = rng.standard_normal((L, Hkv, Dh))
    positions = np.full(T, -1, np.int32)
    positions[:n_real] = start + np.arange(n_real)
    slots = np.where(positions >= 0, table[np.maximum(positions, 0) // S] * S + positions % S, -1)
    q = rng.standard_normal((T, Hq, Dh)).astype(np.float32)
    kn = rng.standard_normal((T, Hkv, Dh)).astype(np.float32)
    vn = rng.standard_normal((T, Hkv, Dh)).astype(np.float32)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return (cast(q), cast(k), cast(v), cast(kn), cast(vn), jnp.asarray(table), jnp.asarray(positions),
            jnp.asarray(slots.astype(np.int32)))


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2), (8, 2), (8, 1)])     # GQA ratios 1, 3, 4, 8
@pytest.mark.parametrize("S", [16, 32])
def test_chunk_over_earlier_pages_matches_reference(Hq, Hkv, S):
    seed = _seed()
    rng = np.random.default_rng(seed)
    T, P_max = 16, 5
    start = int(rng.integers(0, P_max * S - T + 1))                    # earlier chunks: any length
    n_real = int(rng.integers(1, T + 1))
    q, k, v, kn, vn, table, positions, slots = _chunk_case(rng, T, n_real, start, Hq, Hkv, 32, S, P_max)
    layer = int(rng.integers(0, 2))
    k, v = write_kv(k, v, layer, kn, vn, slots)                        # the step writes the chunk first
    ref = prefill_attention_reference(q, k, v, layer, table, positions, scale=0.2)
    for ppb, br in ((1, 16), (2, 64)):
        got = prefill_attention(q, k, v, layer, table, positions, scale=0.2, pages_per_block=ppb,
                                block_rows=br, interpret=True)
        msg = f"seed={seed} start={start} n_real={n_real} ppb={ppb} br={br}"
        assert not np.isnan(np.asarray(got)).any(), msg
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5, err_msg=msg)
    assert np.all(np.asarray(got)[n_real:] == 0)                       # padding tokens output 0


def test_first_chunk_bf16_soft_cap_page_128():
    seed = _seed()
    rng = np.random.default_rng(seed)
    q, k, v, kn, vn, table, positions, slots = _chunk_case(rng, 24, 21, 0, 8, 2, 64, 128, 2,
                                                           dtype=jnp.bfloat16)
    k, v = write_kv(k, v, 1, kn, vn, slots)
    ref = prefill_attention_reference(q, k, v, 1, table, positions, scale=0.125, soft_cap=20.0)
    got = prefill_attention(q, k, v, 1, table, positions, scale=0.125, soft_cap=20.0, interpret=True)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=2e-2,
                               atol=2e-2, err_msg=f"seed={seed}")


@pytest.mark.parametrize("Dh,dtype", [(80, jnp.float32), (96, jnp.bfloat16), (100, jnp.float32)])
def test_head_dim_not_a_power_of_two(Dh, dtype):
    """Triton tiles are powers of two: q is zero-padded to pow2(Dh) lanes, K/V lanes >= Dh are clamped
    loads (stale NaN in unwritten slots everywhere else), the padded output lanes are dropped."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    q, k, v, kn, vn, table, positions, slots = _chunk_case(rng, 16, 13, 37, 6, 2, Dh, 16, 4, dtype=dtype)
    k, v = write_kv(k, v, 1, kn, vn, slots)
    ref = prefill_attention_reference(q, k, v, 1, table, positions, scale=0.1, soft_cap=20.0)
    got = prefill_attention(q, k, v, 1, table, positions, scale=0.1, soft_cap=20.0, pages_per_block=1,
                            block_rows=16, interpret=True)
    assert got.shape == q.shape and got.dtype == dtype
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol,
                               err_msg=f"seed={seed}")
    assert np.all(np.asarray(got, np.float32)[13:] == 0)


def test_all_padding_chunk_outputs_zeros_and_bad_shapes_raise():
    rng = np.random.default_rng(_seed())
    q, k, v, _, _, table, _, _ = _chunk_case(rng, 8, 1, 3, 4, 2, 16, 16, 2)
    got = prefill_attention(q, k, v, 0, table, jnp.full((8,), -1, jnp.int32), scale=0.3, interpret=True)
    assert np.all(np.asarray(got) == 0)
    with pytest.raises(ValueError):
        prefill_attention(q, k, v, 0, table, jnp.zeros((7,), jnp.int32), scale=0.3, interpret=True)
    with pytest.raises(ValueError):
        prefill_attention(q, k, v, 0, table, jnp.zeros((8,), jnp.int32), scale=0.3, block_rows=24,
                          interpret=True)


def test_under_jit_with_traced_layer():
    rng = np.random.default_rng(_seed())
    q, k, v, kn, vn, table, positions, slots = _chunk_case(rng, 16, 16, 20, 6, 3, 16, 16, 4)
    k, v = write_kv(k, v, 1, kn, vn, slots)
    fn = jax.jit(lambda q, k, v, layer: prefill_attention(q, k, v, layer, table, positions, scale=0.25,
                                                          interpret=True))
    got = fn(q, k, v, jnp.int32(1))
    ref = prefill_attention_reference(q, k, v, 1, table, positions, scale=0.25)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_engine_prefill_through_pallas_kernel_matches_reference(monkeypatch):
    """The engine's jitted ragged step with exact engine shapes (query blocks q[Qb, Hq, Dh], batched over
    blocks, block_table[P_max]) through the Pallas kernel (interpret mode) gives the same greedy tokens
    as the reference, under the compile guard. The ragged attention's prefill call is redirected here."""
    import ferry.kernels.ragged_attention as ragged
    from ferry.engine.config import EngineConfig
    from ferry.engine.llm_engine import LLMEngine
    from ferry.engine.sampling_params import SamplingParams

    def run():
        eng = LLMEngine(EngineConfig(model="random:tiny-gqa3", max_batch=2, max_model_len=64, max_prefill_chunk=16,
                                     num_pages=12, strict_compile_guard=True, warmup_progress=False,
                                     compile_cache_dir=None))
        for i, ids in enumerate(([5, 9, 14, 200], [7, 3] * 12)):              # 24 tokens: two prefill chunks
            eng.add_request(str(i), ids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        res = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    res[o.request_id] = o.token_ids
        return res

    ref = run()
    calls = []

    def pallas_prefill(q, k_cache, v_cache, layer, block_table, positions, *, scale, soft_cap=None, window=None,
                       impl="auto"):
        calls.append(q.shape)
        return prefill_attention(q, k_cache, v_cache, layer, block_table, positions, scale=scale,
                                 soft_cap=soft_cap, window=window, interpret=True)

    monkeypatch.setattr(ragged, "prefill_attention", pallas_prefill)
    assert run() == ref and calls

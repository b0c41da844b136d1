"""Pallas K/V write into pages (interpret mode) against the XLA scatter reference, fresh random inputs.

The write is a copy, so results must match the reference bit for bit (raw bits compared). Caches
are poisoned beforehand (NaN in about half the elements, random finite values elsewhere), so an
element written at the wrong place or left unwritten differs from the reference. Interpret mode
drops stores to out-of-bounds indices, so the masks that keep padding lanes off the cache on a GPU
are checked in the Triton IR instead (test_lowers_to_triton_for_gpu_on_a_cpu_host).
"""
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ferry.kernels.kv_write_pallas import write_kv
from ferry.kernels.prefill_attention import write_kv as write_kv_dispatch
from ferry.kernels.prefill_attention import write_kv_reference


def _seed():
    return int(np.random.SeedSequence().entropy % 2**31)


def _bits(x):
    a = np.asarray(x)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _case(rng, T, *, L=3, Hkv=2, P=7, S=4, Dh=16, n_pad=0, cache_dtype=jnp.float32, kv_dtype=jnp.float32):
    """Poisoned caches; T distinct slots shuffled across pages, n_pad of them replaced by -1 at random rows."""
    def poisoned():
        c = rng.standard_normal((L, Hkv, P, S, Dh)).astype(np.float32)
        c[rng.random(c.shape) < 0.5] = np.nan
        return jnp.asarray(c, cache_dtype)
    slots = rng.permutation(P * S)[:T].astype(np.int32)
    slots[rng.permutation(T)[:n_pad]] = -1
    k = jnp.asarray(rng.standard_normal((T, Hkv, Dh)), kv_dtype)
    v = jnp.asarray(rng.standard_normal((T, Hkv, Dh)), kv_dtype)
    return poisoned(), poisoned(), k, v, jnp.asarray(slots)


def _assert_same(got, ref, before, layer, msg):
    for g, r, b, name in zip(got, ref, before, "kv"):
        assert g.dtype == r.dtype and g.shape == r.shape, msg
        np.testing.assert_array_equal(_bits(g), _bits(r), err_msg=f"{name} cache: {msg}")
        others = [i for i in range(b.shape[0]) if i != layer]
        np.testing.assert_array_equal(_bits(g)[others], _bits(b)[others], err_msg=f"{name} other layers: {msg}")


@pytest.mark.parametrize("cache_dtype,kv_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32),
                                                  (jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.bfloat16)])
@pytest.mark.parametrize("T,block", [(1, 8), (13, 8), (37, 16), (40, 32), (64, 32)])
def test_matches_reference_bit_for_bit(cache_dtype, kv_dtype, T, block):
    seed = _seed()
    rng = np.random.default_rng(seed)
    n_pad = int(rng.integers(0, T // 2 + 1))
    kc, vc, k, v, slots = _case(rng, T, P=20, n_pad=n_pad, cache_dtype=cache_dtype, kv_dtype=kv_dtype)
    layer = int(rng.integers(0, 3))
    ref = write_kv_reference(kc, vc, layer, k, v, slots)
    got = write_kv(kc, vc, layer, k, v, slots, tokens_per_block=block, interpret=True)
    _assert_same(got, ref, (kc, vc), layer, f"seed={seed} T={T} block={block} n_pad={n_pad} layer={layer}")
    # every real token landed exactly where its slot says (not just "same as the reference")
    s = np.asarray(slots)
    real = s >= 0
    page, off = s[real] // 4, s[real] % 4
    np.testing.assert_array_equal(_bits(got[0])[layer][:, page, off].transpose(1, 0, 2),
                                  _bits(k.astype(cache_dtype))[real], err_msg=f"seed={seed}")


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 50), S=st.sampled_from([1, 4, 16]), Hkv=st.integers(1, 3), Dh=st.sampled_from([8, 12, 80]),
       block=st.sampled_from([8, 16, 32]), pad_frac=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_and_padding(T, S, Hkv, Dh, block, pad_frac, seed):
    """Includes head dims that are not powers of two (padded to pow2 lanes in the kernel)."""
    rng = np.random.default_rng(seed)
    P = -(-T // S) + int(rng.integers(1, 4))
    kc, vc, k, v, slots = _case(rng, T, L=2, Hkv=Hkv, P=P, S=S, Dh=Dh, n_pad=int(pad_frac * T),
                                cache_dtype=jnp.bfloat16)
    ref = write_kv_reference(kc, vc, 1, k, v, slots)
    got = write_kv(kc, vc, 1, k, v, slots, tokens_per_block=block, interpret=True)
    _assert_same(got, ref, (kc, vc), 1, f"seed={seed}")


def test_all_padding_and_out_of_range_slots_leave_caches_untouched():
    seed = _seed()
    rng = np.random.default_rng(seed)
    kc, vc, k, v, _ = _case(rng, 11)
    P, S = kc.shape[2], kc.shape[3]
    for slots in (np.full(11, -1), np.array([-1, P * S, P * S + 5, -7, 2**30] * 2 + [-1])):
        got = write_kv(kc, vc, 0, k, v, jnp.asarray(slots, jnp.int32), interpret=True)
        ref = write_kv_reference(kc, vc, 0, k, v, jnp.asarray(slots, jnp.int32))
        _assert_same(got, ref, (kc, vc), 0, f"seed={seed} slots={slots}")
        for g, b in zip(got, (kc, vc)):
            np.testing.assert_array_equal(_bits(g), _bits(b))


def test_traced_layer_under_jit_and_dispatch():
    seed = _seed()
    rng = np.random.default_rng(seed)
    kc, vc, k, v, slots = _case(rng, 19, n_pad=4, cache_dtype=jnp.bfloat16)
    fn = jax.jit(lambda kc, vc, layer: write_kv(kc, vc, layer, k, v, slots, interpret=True))
    for layer in (0, 2):
        ref = write_kv_reference(kc, vc, layer, k, v, slots)
        _assert_same(fn(kc, vc, jnp.int32(layer)), ref, (kc, vc), layer, f"seed={seed} layer={layer}")
        # the model-facing dispatcher: "pallas" on CPU = interpret mode, "auto" on CPU = reference
        _assert_same(write_kv_dispatch(kc, vc, layer, k, v, slots, impl="pallas"), ref, (kc, vc), layer, "pallas")
        _assert_same(write_kv_dispatch(kc, vc, layer, k, v, slots), ref, (kc, vc), layer, "auto")
    with pytest.raises(ValueError):
        write_kv_dispatch(kc, vc, 0, k, v, slots, impl="triton")


def test_donated_caches_are_updated_in_place():
    """With donated caches the compiled step aliases both caches to the outputs and needs far less
    scratch than one cache: the kernel writes the new rows only, never copies the cache."""
    rng = np.random.default_rng(_seed())
    kc, vc, k, v, slots = _case(rng, 37, L=4, Hkv=4, P=64, S=16, Dh=64, n_pad=5)
    fn = jax.jit(lambda kc, vc: write_kv(kc, vc, 1, k, v, slots, interpret=True), donate_argnums=(0, 1))
    mem = fn.lower(kc, vc).compile().memory_analysis()
    assert mem.alias_size_in_bytes == kc.nbytes + vc.nbytes
    assert mem.temp_size_in_bytes < kc.nbytes // 4
    ref = write_kv_reference(kc, vc, 1, k, v, slots)
    ref = [np.asarray(r) for r in ref]
    out = fn(kc, vc)            # (the buffer address is not compared: the CPU runtime may still copy)
    assert kc.is_deleted() and vc.is_deleted()
    for g, r in zip(out, ref):
        np.testing.assert_array_equal(_bits(g), _bits(r))


def test_bad_shapes_raise():
    rng = np.random.default_rng(0)
    kc, vc, k, v, slots = _case(rng, 8)
    with pytest.raises(ValueError):
        write_kv(kc, vc, 0, k, v, slots[:7], interpret=True)
    with pytest.raises(ValueError):
        write_kv(kc, vc, 0, k[:, :1], v[:, :1], slots, interpret=True)
    with pytest.raises(ValueError):
        write_kv(kc, vc, 0, k, v, slots, tokens_per_block=24, interpret=True)


@pytest.mark.parametrize("Dh", [128, 80])
def test_lowers_to_triton_for_gpu_on_a_cpu_host(capsys, Dh):
    """Cross-platform lowering (no GPU needed): the Triton lowering accepts the kernel's indexing
    (Llama-3-8B-like shapes, 8 GiB caches -> 64-bit offsets), both caches are aliased to the outputs
    of the Triton custom call, and both cache stores carry a mask. Interpret mode cannot catch a lost
    mask (its scatter drops the out-of-range sentinel page), but on a GPU an unmasked padding lane
    would write into the next head's first page. Not a compile: PTX generation needs a GPU build."""
    kc = jax.ShapeDtypeStruct((32, 8, 8192, 16, Dh), jnp.bfloat16)         # 8 (5) GiB per cache
    k = jax.ShapeDtypeStruct((37, 8, Dh), jnp.bfloat16)
    slots = jax.ShapeDtypeStruct((37,), jnp.int32)
    fn = jax.jit(lambda kc, vc, k, v, s, layer: write_kv(kc, vc, layer, k, v, s, debug=True),
                 donate_argnums=(0, 1))
    if "lowering_platforms" not in inspect.signature(jax.stages.Traced.lower).parameters:  # pragma: no cover
        pytest.skip("jax.stages.Traced.lower has no lowering_platforms")    # (a tracing error must fail)
    lowered = fn.trace(kc, kc, k, k, slots, jax.ShapeDtypeStruct((), jnp.int32)).lower(
        lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "xla.gpu.triton" in text
    assert text.count("output_operand_alias<") == 2
    ttir = capsys.readouterr().out
    stores = re.findall(r"tt\.store (%[\w.]+(?:, %[\w.]+)*) :", ttir)
    assert len(stores) == 2, ttir[-3000:]
    assert all(len(ops.split(",")) == 3 for ops in stores), stores        # ptr, value, mask
    assert "i64" in ttir                                                   # 64-bit offsets past 4 GiB

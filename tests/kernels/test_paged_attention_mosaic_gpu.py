"""The Mosaic GPU decode variant (kernels/paged_attention_mosaic_gpu.py) in Mosaic GPU interpret mode
against the pure-JAX reference, fresh random inputs. Interpret mode simulates SMEM, the TMA copies
and the barriers (so the page walk, the SMEM ring and its refills, the meta row, the masking and the
online softmax are all exercised); the two products run as plain dots there (no WGMMA on a
transposed ref in that mode): the WGMMA path is checked by lowering (tests/kernels/test_lowering.py).
Slots past seq_len in the last page hold NaN (stale data): the output must not see them."""
import jax.numpy as jnp
import numpy as np
import pytest

from ferry.kernels.paged_attention import paged_attention_reference
from ferry.kernels.paged_attention_mosaic_gpu import paged_attention

pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params", reason="no Mosaic GPU interpret mode")


def _case(rng, B, Hq, Hkv, Dh, S, P_max, dtype, L=2):
    P = B * P_max + 2
    k = rng.standard_normal((L, Hkv, P, S, Dh)).astype(np.float32)
    v = rng.standard_normal((L, Hkv, P, S, Dh)).astype(np.float32)
    lens = rng.integers(1, P_max * S + 1, size=B).astype(np.int32)
    lens[0] = P_max * S                                               # full table
    if B > 2:
        lens[-1] = 0                                                  # padding row
    tables = np.zeros((B, P_max), np.int32)
    perm = rng.permutation(np.arange(1, P))
    for b in range(B):
        n = -(-int(lens[b]) // S)
        tables[b, :n] = perm[b * P_max:b * P_max + n]
        if n:
            off = int(lens[b]) - (n - 1) * S
            k[:, :, tables[b, n - 1], off:] = np.nan
            v[:, :, tables[b, n - 1], off:] = np.nan
    q = rng.standard_normal((B, Hq, Dh)).astype(np.float32)
    c = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return c(q), c(k), c(v), jnp.asarray(tables), jnp.asarray(lens)


@pytest.mark.parametrize("Hq,Hkv,Dh,S,P_max,steps,dtype,cap", [
    (8, 2, 64, 16, 9, 2, jnp.bfloat16, None),           # GQA 4, 3 blocks of 64 tokens through a 2-slot ring
    (4, 4, 128, 32, 7, 3, jnp.float16, None),           # MHA, Dh 128, page 32, 3-deep ring
    (16, 2, 64, 64, 4, 1, jnp.bfloat16, 30.0),          # GQA 8, one page per block, 1 slot, soft cap
    (9, 3, 64, 16, 17, 2, jnp.bfloat16, None),          # GQA 3, 5 blocks (refills wrap the ring twice)
])
def test_matches_reference_in_interpret_mode(Hq, Hkv, Dh, S, P_max, steps, dtype, cap):
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**31))
    B = 3
    q, k, v, tables, lens = _case(rng, B, Hq, Hkv, Dh, S, P_max, dtype)
    scale = Dh ** -0.5
    got = paged_attention(q, k, v, 1, tables, lens, scale=scale, soft_cap=cap, max_concurrent_steps=steps,
                          interpret=True)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    want = paged_attention_reference(f32(q), f32(k), f32(v), 1, tables, lens, scale=scale, soft_cap=cap)
    assert got.dtype == dtype
    got, want = np.asarray(got, np.float32), np.asarray(want)
    assert got.shape == (B, Hq, Dh)
    assert np.isfinite(got).all()
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 1e-2, (err, lens)
    assert not np.any(got[-1]) or lens[-1] > 0                       # padding row outputs 0


def test_rejects_what_it_cannot_lower():
    """Positive control for the guards: a valid call passes validation, the unsupported ones raise."""
    rng = np.random.default_rng(0)
    q, k, v, tables, lens = _case(rng, 2, 4, 2, 64, 16, 4, jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 64"):
        paged_attention(q[..., :48], k[..., :48], v[..., :48], 0, tables, lens, scale=0.1, interpret=True)
    with pytest.raises(ValueError, match="bf16/f16"):
        paged_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), 0, tables, lens,
                        scale=0.1, interpret=True)
    with pytest.raises(ValueError, match="page size"):
        big = jnp.zeros((2, 2, 3, 128, 64), jnp.bfloat16)             # page 128 > the 64-token block
        paged_attention(q, big, big, 0, tables, lens, scale=0.1, interpret=True)
    out = paged_attention(q, k, v, 0, tables, lens, scale=0.1, interpret=True)
    assert out.shape == q.shape

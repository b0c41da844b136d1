"""Pallas NonZero compaction (interpret mode) against jnp.nonzero and the reference, fresh random inputs.

The scatter kernel writes into a buffer pre-filled with ``fill_value``; interpret mode fills the
count kernel's output with iinfo(int32).min, so unwritten elements show up as wrong values.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferry.kernels import compaction
from ferry.kernels.compaction import nonzero_reference
from ferry.kernels.compaction_pallas import nonzero


def _seed():
    return int(np.random.SeedSequence().entropy % 2**31)


def _expect(x, size, fill):
    idx = jnp.nonzero(jnp.asarray(x), size=size, fill_value=fill)
    return np.stack([np.asarray(i) for i in idx]) if x.ndim > 1 else np.asarray(idx[0])


@pytest.mark.parametrize("n,size,density", [(1000, 1000, 0.3), (1000, 64, 0.5), (3000, 5000, 0.1), (17, 17, 0.5),
                                            (4096, 4096, 0.0), (4096, 4096, 1.0), (2500, 100, 1.0), (1, 3, 1.0)])
def test_1d_matches_jnp_nonzero(n, size, density):
    seed = _seed()
    rng = np.random.default_rng(seed)
    x = (rng.random(n) < density) * rng.integers(1, 5, n)
    idx, count = nonzero(jnp.asarray(x), size=size, fill_value=-1, block=256, interpret=True)
    assert idx.dtype == jnp.int32 and idx.shape == (size,)
    np.testing.assert_array_equal(np.asarray(idx), _expect(x, size, -1), err_msg=f"seed={seed}")
    assert int(count) == int(np.count_nonzero(x))                     # true count, may exceed size
    ridx, rcount = nonzero_reference(jnp.asarray(x), size=size)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ridx), err_msg=f"seed={seed}")
    assert int(rcount) == int(count)


@pytest.mark.parametrize("dtype", [np.float32, np.int8, bool])
@pytest.mark.parametrize("block", [8, 64])
def test_1d_dtypes_and_blocks(dtype, block):
    seed = _seed()
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 700))
    x = ((rng.random(n) < rng.random()) * rng.standard_normal(n)).astype(dtype)
    size = int(rng.integers(0, n + 20))
    fill = int(rng.integers(-9, 9))
    idx, count = nonzero(jnp.asarray(x), size=size, fill_value=fill, block=block, interpret=True)
    np.testing.assert_array_equal(np.asarray(idx), _expect(x, size, fill), err_msg=f"seed={seed} n={n}")
    assert int(count) == int(np.count_nonzero(x)), f"seed={seed}"


@pytest.mark.parametrize("shape", [(7, 33), (3, 5, 11), (1, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.int32, bool])
def test_nd_row_major_coordinates(shape, dtype):
    seed = _seed()
    rng = np.random.default_rng(seed)
    x = (rng.random(shape) < 0.4).astype(dtype)
    size = max(1, int(np.prod(shape)) // 2)
    for fill in (-7, 5):                                              # fill >= 0 must still pad every coordinate
        coords, count = nonzero(jnp.asarray(x), size=size, fill_value=fill, block=64, interpret=True)
        assert coords.shape == (len(shape), size)
        np.testing.assert_array_equal(np.asarray(coords), _expect(x, size, fill), err_msg=f"seed={seed}")
        assert int(count) == int(np.count_nonzero(x))


def test_unwritten_outputs_hold_fill_value_and_count_exceeds_size():
    x = np.zeros(300, np.int32)
    x[[5, 299]] = 1
    idx, count = nonzero(jnp.asarray(x), size=10, fill_value=-3, block=128, interpret=True)
    assert np.asarray(idx).tolist() == [5, 299] + [-3] * 8 and int(count) == 2
    idx, count = nonzero(jnp.ones((3, 4), bool), size=5, interpret=True)
    assert np.asarray(idx).tolist() == [[0, 0, 0, 0, 1], [0, 1, 2, 3, 0]] and int(count) == 12


def test_dispatcher_under_jit_and_bad_input():
    x = jnp.asarray(np.random.default_rng(_seed()).random(50) < 0.5)
    got = jax.jit(lambda a: compaction.nonzero(a, size=50, impl="pallas"))(x)
    np.testing.assert_array_equal(np.asarray(got[0]), _expect(np.asarray(x), 50, -1))
    for kwargs in ({"size": -1}, {"size": 4, "block": 100}):
        with pytest.raises(ValueError):
            nonzero(x, interpret=True, **kwargs)
    with pytest.raises(ValueError):
        nonzero(jnp.float32(1.0), size=1, interpret=True)

"""Pallas NonZero compaction (interpret mode) against jnp.nonzero and the reference, fresh random inputs."""
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.compaction import nonzero_reference
from kernels.compaction_pallas import nonzero


def _expect(x, size, fill):
    idx = jnp.nonzero(jnp.asarray(x), size=size, fill_value=fill)
    return np.stack([np.asarray(i) for i in idx]) if x.ndim > 1 else np.asarray(idx[0])


@pytest.mark.parametrize("n,size,density", [(1000, 1000, 0.3), (1000, 64, 0.5), (3000, 5000, 0.1), (17, 17, 0.5),
                                            (4096, 4096, 0.0), (4096, 4096, 1.0), (2500, 100, 1.0)])
def test_1d_matches_jnp_nonzero(n, size, density):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    x = (rng.random(n) < density) * rng.integers(1, 5, n)
    idx, count = nonzero(jnp.asarray(x), size=size, fill_value=-1, block=256, interpret=True)
    np.testing.assert_array_equal(np.asarray(idx), _expect(x, size, -1), err_msg=f"seed={seed}")
    assert int(count) == int(np.count_nonzero(x))                     # true count, may exceed size
    ridx, rcount = nonzero_reference(jnp.asarray(x), size=size)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ridx))


@pytest.mark.parametrize("shape", [(7, 33), (3, 5, 11)])
@pytest.mark.parametrize("dtype", [np.float32, np.int32, bool])
def test_nd_row_major_coordinates(shape, dtype):
    rng = np.random.default_rng()
    x = (rng.random(shape) < 0.4).astype(dtype)
    size = int(np.prod(shape)) // 2
    coords, count = nonzero(jnp.asarray(x), size=size, fill_value=-7, block=64, interpret=True)
    assert coords.shape == (len(shape), size)
    np.testing.assert_array_equal(np.asarray(coords), _expect(x, size, -7))
    assert int(count) == int(np.count_nonzero(x))


def test_unwritten_outputs_hold_fill_value():
    x = np.zeros(300, np.int32)
    x[[5, 299]] = 1
    idx, count = nonzero(jnp.asarray(x), size=10, fill_value=-3, block=128, interpret=True)
    assert np.asarray(idx).tolist() == [5, 299] + [-3] * 8 and int(count) == 2

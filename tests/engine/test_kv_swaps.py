"""KV page copies (engine/kv_cache.py): a swap-out does not wait for its device-to-host copy; the
bytes reach the host pages at ``finish_swaps`` (or before a swap-in that may read them), and a
round trip restores every page exactly, whatever the device does in between."""
import jax.numpy as jnp
import numpy as np

from ferry.engine.compile_guard import CompileGuard
from ferry.engine.config import EngineConfig
from ferry.engine.kv_cache import KVCache
from ferry.models.config import SHAPES


def _kv(num_pages=12, host_pages=8):
    cfg = SHAPES["tiny"]
    ecfg = EngineConfig(model="random:tiny", max_model_len=64, page_size=4)
    return KVCache(cfg, num_pages, 4, host_pages, jnp.float32, ecfg.buckets(), CompileGuard(strict=False))


def test_swap_round_trip_is_exact_and_swap_out_is_deferred():
    rng = np.random.default_rng()
    kv = _kv()
    k0 = rng.standard_normal(kv.k.shape).astype(np.float32)
    v0 = rng.standard_normal(kv.v.shape).astype(np.float32)
    k0[:, :, 0] = v0[:, :, 0] = 0.0                              # the null page stays zero
    kv.k, kv.v = jnp.asarray(k0), jnp.asarray(v0)
    dev = rng.choice(np.arange(1, 12), 5, replace=False).tolist()
    host = rng.choice(np.arange(8), 5, replace=False).tolist()
    kv.swap_out(list(zip(dev, host)))
    assert kv._pending and not kv.host_k[:, :, host].any()      # not written yet: the copy is in flight
    kv.k, kv.v = jnp.zeros_like(kv.k), jnp.zeros_like(kv.v)     # the device pages are reused at once
    kv.finish_swaps()
    np.testing.assert_array_equal(kv.host_k[:, :, host], k0[:, :, dev])
    np.testing.assert_array_equal(kv.host_v[:, :, host], v0[:, :, dev])
    back = rng.choice(np.arange(1, 12), 5, replace=False).tolist()
    kv.swap_in(list(zip(host, back)))
    np.testing.assert_array_equal(np.asarray(kv.k)[:, :, back], k0[:, :, dev])
    np.testing.assert_array_equal(np.asarray(kv.v)[:, :, back], v0[:, :, dev])
    assert not np.asarray(kv.k)[:, :, 0].any()                 # padding wrote only the null page, with zeros


def test_swap_in_right_after_swap_out_reads_the_new_bytes():
    """A swap-in of host pages whose swap-out is still in flight finishes that copy first."""
    rng = np.random.default_rng()
    kv = _kv()
    k0 = rng.standard_normal(kv.k.shape).astype(np.float32)
    k0[:, :, 0] = 0.0
    kv.k, kv.v = jnp.asarray(k0), jnp.asarray(k0)
    kv.swap_out([(3, 1), (7, 2)])
    kv.swap_in([(1, 9), (2, 10)])
    assert not kv._pending
    np.testing.assert_array_equal(np.asarray(kv.k)[:, :, [9, 10]], k0[:, :, [3, 7]])

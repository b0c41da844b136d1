"""Random weights drawn on the device (models/random_weights.py, ``on_device``): the same tree,
shapes, dtypes and scale as the numpy draw, and ``runtime_params`` keeps them on the device with the
same layout it gives numpy arrays."""
import jax
import jax.numpy as jnp
import numpy as np

from ferry.models.config import SHAPES
from ferry.models.llama import runtime_params
from ferry.models.random_weights import random_params


def test_device_draw_matches_the_numpy_draw_in_layout_and_scale():
    cfg = SHAPES["tiny"]
    host = random_params(cfg, seed=0)
    dev = random_params(cfg, seed=0, dtype=jnp.bfloat16, on_device=True)
    h_leaves, h_tree = jax.tree.flatten(host)
    d_leaves, d_tree = jax.tree.flatten(dev)
    assert h_tree == d_tree
    assert all(isinstance(d, jax.Array) and d.dtype == jnp.bfloat16 and d.shape == h.shape
               for h, d in zip(h_leaves, d_leaves))
    wq = np.asarray(dev["layers"]["wq"], np.float32)            # std 1/sqrt(fan_in), fan_in = D
    assert abs(wq.std() * np.sqrt(cfg.hidden_size) - 1) < 0.05
    assert not np.array_equal(wq[0], wq[1])                       # layers drawn independently
    np.testing.assert_array_equal(np.asarray(dev["layers"]["attn_norm"], np.float32), 1.0)


def test_runtime_params_keeps_device_arrays_on_device_in_the_host_layout():
    cfg = SHAPES["tiny"]
    dev = random_params(cfg, seed=1, on_device=True)
    as_host = jax.tree.map(np.asarray, dev)
    got, want = runtime_params(dev), runtime_params(as_host)
    g_leaves, g_tree = jax.tree.flatten(got)
    w_leaves, w_tree = jax.tree.flatten(want)
    assert g_tree == w_tree
    for g, w in zip(g_leaves, w_leaves):
        assert isinstance(g, jax.Array) and isinstance(w, np.ndarray)
        np.testing.assert_array_equal(np.asarray(g), w)

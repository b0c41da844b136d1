"""Sliding window in the Pallas attention kernels (interpret mode) against the references, fresh random inputs.

The kernels must not read pages that lie wholly before the window: their page walks start at the
first page holding a visible key (dynamic loop bounds). To make that observable, the tests poison
(NaN) every page that lies wholly before the window of every query, on shuffled pages, and require
a finite output equal to the reference computed on the clean caches. The kernels' window masks trim
only the head of the first visited page (positions before the walk's start are deliberately left
unmasked), so a walk that started early would let the NaN in. Positive controls: the same poison on
a page inside the window gives NaN, and a walk without a window over the poisoned caches gives NaN.
"""
import re

import jax.numpy as jnp
import numpy as np
import pytest

from ferry.kernels.paged_attention import paged_attention_reference
from ferry.kernels.paged_attention_pallas import paged_attention
from ferry.kernels.prefill_attention import prefill_attention_reference
from ferry.kernels.prefill_attention_pallas import prefill_attention

S, Dh, L = 4, 16, 2


def _seed():
    return int(np.random.SeedSequence().entropy % 2**31)


# ----------------------------------------------------------------------------- decode
def _decode_case(rng, B, Hq, Hkv, P_max, window):
    """Rows on disjoint shuffled pages; returns clean and poisoned caches and the poisoned page ids.
    Poisoned: every page wholly before its row's window (positions < seq_len - window, page-wise),
    and the slots past seq_len in each row's last page."""
    P = B * P_max + 1
    k = rng.standard_normal((L, Hkv, P, S, Dh)).astype(np.float32)
    v = rng.standard_normal((L, Hkv, P, S, Dh)).astype(np.float32)
    lens = rng.integers(1, P_max * S + 1, size=B)
    lens[0] = P_max * S                                               # full table: most pages outside
    lens[1] = min(P_max * S, window + S + int(rng.integers(0, S)))    # just past one window
    lens[-1] = 0                                                      # padding row
    tables = np.zeros((B, P_max), np.int32)
    perm = rng.permutation(np.arange(1, P))
    kp, vp = k.copy(), v.copy()
    outside = []
    for b in range(B):
        n = -(-int(lens[b]) // S)
        tables[b, :n] = perm[b * P_max:b * P_max + n]
        for j in range(max(0, int(lens[b]) - window) // S):           # pages wholly before the window
            kp[:, :, tables[b, j]] = np.nan
            vp[:, :, tables[b, j]] = np.nan
            outside.append((b, j))
        if n:
            off = int(lens[b]) - (n - 1) * S
            kp[:, :, tables[b, n - 1], off:] = np.nan
            vp[:, :, tables[b, n - 1], off:] = np.nan
    q = rng.standard_normal((B, Hq, Dh)).astype(np.float32)
    j = jnp.asarray
    return j(q), (j(k), j(v)), (j(kp), j(vp)), j(tables), j(lens.astype(np.int32)), outside


DECODE_KNOBS = [dict(num_splits=1, pages_per_block=1), dict(num_splits=3, pages_per_block=1),
                dict(num_splits=2, pages_per_block=2), dict(pages_per_block=4), dict(backend="tpu")]


@pytest.mark.parametrize("soft_cap", [None, 3.0])
@pytest.mark.parametrize("window", [1, 5, 8])
def test_decode_window_skips_pages_outside(window, soft_cap):
    seed = _seed()
    rng = np.random.default_rng(seed)
    q, (k, v), (kp, vp), bt, lens, outside = _decode_case(rng, B=5, Hq=4, Hkv=2, P_max=6, window=window)
    assert outside                                                   # the test poisons something
    layer = int(rng.integers(0, L))
    ref = paged_attention_reference(q, k, v, layer, bt, lens, scale=0.3, soft_cap=soft_cap, window=window)
    for kw in DECODE_KNOBS:
        got = np.asarray(paged_attention(q, kp, vp, layer, bt, lens, scale=0.3, soft_cap=soft_cap, window=window,
                                         interpret=True, **kw))
        msg = f"seed={seed} window={window} {kw} lens={np.asarray(lens)}"
        assert np.isfinite(got).all(), msg
        np.testing.assert_allclose(got, np.asarray(ref), rtol=2e-5, atol=2e-5, err_msg=msg)
        assert np.all(got[np.asarray(lens) == 0] == 0), msg           # padding row: 0


def test_decode_window_wider_than_the_row_is_no_window():
    """A window covering every row's keys changes nothing (and reads nothing new)."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    q, (k, v), _, bt, lens, _ = _decode_case(rng, B=4, Hq=6, Hkv=2, P_max=5, window=100)
    ref = paged_attention_reference(q, k, v, 0, bt, lens, scale=0.2)
    for kw in DECODE_KNOBS:
        got = paged_attention(q, k, v, 0, bt, lens, scale=0.2, window=100, interpret=True, **kw)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5, err_msg=f"seed={seed} {kw}")


def test_decode_poison_positive_controls():
    """The poison is live: on a page inside the window it reaches the output (NaN), and a walk
    without a window over the same poisoned caches reads the pages before the window (NaN)."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    window = 5
    q, _, (kp, vp), bt, lens, outside = _decode_case(rng, B=4, Hq=4, Hkv=2, P_max=6, window=window)
    for kw in DECODE_KNOBS:
        got = np.asarray(paged_attention(q, kp, vp, 0, bt, lens, scale=0.3, interpret=True, **kw))
        assert np.isnan(got[0]).all(), f"seed={seed} {kw}"            # row 0: pages before its window
    last = int(bt[0, bt.shape[1] - 1])                                # row 0's last page (full): inside the window
    kp2, vp2 = kp.at[:, :, last].set(jnp.nan), vp.at[:, :, last].set(jnp.nan)
    for kw in DECODE_KNOBS:
        got = np.asarray(paged_attention(q, kp2, vp2, 0, bt, lens, scale=0.3, window=window, interpret=True, **kw))
        assert np.isnan(got[0]).all(), f"seed={seed} {kw}"
        assert np.isfinite(got[1:]).all(), f"seed={seed} {kw}"        # other rows: untouched


def test_decode_window_is_validated():
    q = jnp.zeros((1, 2, Dh))
    kc = jnp.zeros((1, 1, 2, S, Dh))
    with pytest.raises(ValueError, match="window"):
        paged_attention(q, kc, kc, 0, jnp.ones((1, 1), jnp.int32), jnp.ones((1,), jnp.int32), scale=1.0,
                        window=0, interpret=True)


# ----------------------------------------------------------------------------- prefill
def _prefill_case(rng, T, n_real, start, Hq, Hkv, P_max, window):
    """One request: tokens 0..start+n_real-1 cached (the chunk included), on shuffled pages, rows
    past n_real padding. Poisoned: pages wholly before the window of the chunk's first token (so of
    every token) and the slots past the chunk's last position."""
    P = P_max + 4
    k = rng.standard_normal((L, Hkv, P, S, Dh)).astype(np.float32)
    v = rng.standard_normal((L, Hkv, P, S, Dh)).astype(np.float32)
    end = start + n_real
    table = np.zeros(P_max, np.int32)
    n_pages = -(-end // S)
    table[:n_pages] = rng.permutation(np.arange(1, P))[:n_pages]
    kp, vp = k.copy(), v.copy()
    first_visible = max(0, start - window + 1)                        # the first token's window start
    outside = list(range(first_visible // S))
    for j in outside:
        kp[:, :, table[j]] = np.nan
        vp[:, :, table[j]] = np.nan
    kp[:, :, table[n_pages - 1], end - (n_pages - 1) * S:] = np.nan   # past the chunk
    vp[:, :, table[n_pages - 1], end - (n_pages - 1) * S:] = np.nan
    positions = np.full(T, -1, np.int32)
    positions[:n_real] = start + np.arange(n_real)
    q = rng.standard_normal((T, Hq, Dh)).astype(np.float32)
    j = jnp.asarray
    return j(q), (j(k), j(v)), (j(kp), j(vp)), j(table), j(positions), outside


PREFILL_KNOBS = [dict(pages_per_block=1, block_rows=16), dict(pages_per_block=2, block_rows=16),
                 dict(pages_per_block=4, block_rows=32)]


@pytest.mark.parametrize("soft_cap", [None, 3.0])
@pytest.mark.parametrize("window", [1, 6, 9])
def test_prefill_window_skips_pages_outside(window, soft_cap):
    seed = _seed()
    rng = np.random.default_rng(seed)
    T, P_max = 12, 10
    n_real = int(rng.integers(T - 3, T + 1))
    start = int(rng.integers(window + 2 * S, P_max * S - n_real + 1))  # long history: pages to skip
    q, (k, v), (kp, vp), table, positions, outside = _prefill_case(rng, T, n_real, start, 6, 2, P_max, window)
    assert outside
    layer = int(rng.integers(0, L))
    ref = prefill_attention_reference(q, k, v, layer, table, positions, scale=0.3, soft_cap=soft_cap, window=window)
    for kw in PREFILL_KNOBS:
        got = np.asarray(prefill_attention(q, kp, vp, layer, table, positions, scale=0.3, soft_cap=soft_cap,
                                           window=window, interpret=True, **kw))
        msg = f"seed={seed} window={window} start={start} n_real={n_real} {kw}"
        assert np.isfinite(got).all(), msg
        np.testing.assert_allclose(got, np.asarray(ref), rtol=2e-5, atol=2e-5, err_msg=msg)
        assert np.all(got[n_real:] == 0), msg                         # padding tokens: 0


def test_prefill_window_from_the_first_chunk():
    """A chunk starting at position 0 (nothing to skip), window shorter than the chunk, all-padding chunk."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    q, (k, v), _, table, positions, _ = _prefill_case(rng, 16, 14, 0, 4, 2, 6, 3)
    ref = prefill_attention_reference(q, k, v, 1, table, positions, scale=0.3, window=3)
    for kw in PREFILL_KNOBS:
        got = prefill_attention(q, k, v, 1, table, positions, scale=0.3, window=3, interpret=True, **kw)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5, err_msg=f"seed={seed} {kw}")
    pad = jnp.full((16,), -1, jnp.int32)
    got = prefill_attention(q, k, v, 1, table, pad, scale=0.3, window=3, interpret=True)
    assert np.all(np.asarray(got) == 0)


def test_prefill_poison_positive_controls():
    """The poison is live: a page inside the window gives NaN; without a window the walk reads the
    poisoned pages before it (NaN)."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    window, T, P_max = 6, 8, 10
    q, _, (kp, vp), table, positions, outside = _prefill_case(rng, T, T, 5 * S + 1, 4, 2, P_max, window)
    assert outside
    for kw in PREFILL_KNOBS:
        got = np.asarray(prefill_attention(q, kp, vp, 0, table, positions, scale=0.3, interpret=True, **kw))
        assert np.isnan(got).all(), f"seed={seed} {kw}"
    inside = int(table[int(positions[-1]) // S])                      # the last token's page
    kp2, vp2 = kp.at[:, :, inside].set(jnp.nan), vp.at[:, :, inside].set(jnp.nan)
    for kw in PREFILL_KNOBS:
        got = np.asarray(prefill_attention(q, kp2, vp2, 0, table, positions, scale=0.3, window=window,
                                           interpret=True, **kw))
        assert np.isnan(got[-1]).all(), f"seed={seed} {kw}"


# ----------------------------------------------------------------------------- Mosaic GPU decode variant
@pytest.mark.parametrize("window,steps,cap", [(70, 2, None), (17, 1, 30.0)])
def test_mosaic_gpu_variant_window_in_interpret_mode(window, steps, cap):
    """The opt-in Mosaic GPU variant (Mosaic GPU interpret mode: TMA copies and the SMEM ring
    simulated): pages before each row's window poisoned, output finite and equal to the reference."""
    pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params", reason="no Mosaic GPU interpret mode")
    from ferry.kernels.paged_attention_mosaic_gpu import paged_attention as mgpu_paged_attention
    seed = _seed()
    rng = np.random.default_rng(seed)
    B, Hq, Hkv, D, Sg, P_max = 3, 8, 2, 64, 16, 9
    P = B * P_max + 1
    k = rng.standard_normal((L, Hkv, P, Sg, D)).astype(np.float32)
    v = rng.standard_normal((L, Hkv, P, Sg, D)).astype(np.float32)
    lens = np.array([P_max * Sg, int(rng.integers(window + Sg, P_max * Sg)), 0], np.int32)
    tables = np.zeros((B, P_max), np.int32)
    perm = rng.permutation(np.arange(1, P))
    kp, vp = k.copy(), v.copy()
    for b in range(B):
        n = -(-int(lens[b]) // Sg)
        tables[b, :n] = perm[b * P_max:b * P_max + n]
        for j in range(max(0, int(lens[b]) - window) // Sg):
            kp[:, :, tables[b, j]] = vp[:, :, tables[b, j]] = np.nan
        if n:
            off = int(lens[b]) - (n - 1) * Sg
            kp[:, :, tables[b, n - 1], off:] = vp[:, :, tables[b, n - 1], off:] = np.nan
    q = rng.standard_normal((B, Hq, D)).astype(np.float32)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    got = mgpu_paged_attention(bf(q), bf(kp), bf(vp), 1, jnp.asarray(tables), jnp.asarray(lens), scale=D ** -0.5,
                               soft_cap=cap, window=window, max_concurrent_steps=steps, interpret=True)
    f32 = lambda a: jnp.asarray(bf(a), jnp.float32)  # noqa: E731
    want = np.asarray(paged_attention_reference(f32(q), f32(k), f32(v), 1, jnp.asarray(tables), jnp.asarray(lens),
                                                scale=D ** -0.5, soft_cap=cap, window=window))
    got = np.asarray(got, np.float32)
    assert np.isfinite(got).all(), f"seed={seed} lens={lens}"
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 1e-2, (err, seed, lens)
    assert not np.any(got[-1])                                        # padding row outputs 0


# ----------------------------------------------------------------------------- lowering (GPU / TPU, on the CPU host)
def _lowering():
    return pytest.importorskip("tests.kernels.test_lowering")


@pytest.mark.parametrize("dt", ["bf16", "f32"])
def test_window_lowers_to_triton(dt):
    """Decode and prefill with a window lower to one Triton launch each, with the same page walk
    (one loop: table [T], K and V [T, Dh] gathers) and tiles as without; split-K sized by the window."""
    low = _lowering()
    from ferry.kernels.paged_attention_pallas import default_pages_per_block, default_splits
    dtype, ir_t = low.DT[dt]
    B, Hkv, G, Dh, S16, P_max, window = 3, 2, 4, 128, 16, 24, 100
    ppb = default_pages_per_block(S16, P_max)
    T = ppb * S16
    live = min(-(-P_max // ppb), -(-(window + S16 - 1) // T))
    for splits in (1, None):
        [k] = low.launches(low._lower_pa(low._pa_args(B, G * Hkv, Hkv, Dh, S16, P_max, dtype), num_splits=splits,
                                         window=window, soft_cap=30.0))
        n = 1 if splits == 1 else min(default_splits(B, Hkv, live), live)
        assert k.name == "ferry_paged_attention" and k.grid == (B, Hkv, n), k.grid
        low._check_dots(low.dots(k.ttir), 16, T, Dh, ir_t, dt == "f32")
        assert low.loop_loads(k.ttir) == [((T,), "i32"), ((T, Dh), ir_t), ((T, Dh), ir_t)]
        assert low._soft_capped(k.ttir)
    [k] = low.launches(low._lower_prefill(low._prefill_args(100, G * Hkv, Hkv, Dh, S16, P_max, dtype), window=window))
    assert k.name == "ferry_prefill_attention"
    low._check_dots(low.dots(k.ttir), 64, T, Dh, ir_t, dt == "f32")
    assert low.loop_loads(k.ttir) == [((T,), "i32"), ((T, Dh), ir_t), ((T, Dh), ir_t)]


@pytest.mark.parametrize("window", [1, 40, 1000])
def test_window_tpu_variant_lowers_to_mosaic(mosaic_modules, window):
    """The Mosaic TPU variant with a window: the page axis of the grid shrinks to the pages a window
    spans (at most P_max), one page of K/V per step."""
    low = _lowering()
    B, Hkv, G, Dh, S16, P_max = 2, 2, 3, 128, 16, 9
    use_mesh, mesh = low._tpu_mesh("TPU v5 lite")
    with use_mesh(mesh):
        lowered = low._lower(lambda q, k, v, bt, sl, layer: paged_attention(
            q, k, v, layer, bt, sl, scale=0.1, window=window, backend="tpu"),
            *low._pa_args(B, G * Hkv, Hkv, Dh, S16, P_max, jnp.bfloat16), platform="tpu")
    assert len(low.launches(lowered, target="tpu_custom_call")) == 1
    [m] = mosaic_modules
    steps = min(P_max, -(-(window + S16 - 1) // S16))
    assert f"iteration_bounds = array<i64: {B}, {Hkv}, {steps}>" in m
    assert m.count(f"window_bounds = array<i64: 1, 1, 1, {S16}, {Dh}>") == 2
    assert m.count("tpu.matmul") == 2


@pytest.mark.parametrize("steps", [1, 3])
def test_window_mosaic_gpu_variant_lowers_for_hopper(steps):
    """The Mosaic GPU variant with a window lowers for sm_90 with the same TMA copies and WGMMAs."""
    low = _lowering()
    from jax._src.lib.mlir import ir
    B, Hkv, G, Dh, S16, P_max = 3, 2, 4, 128, 16, 24
    ppb = 64 // S16
    lowered = low._lower_mgpu(low._pa_args(B, G * Hkv, Hkv, Dh, S16, P_max, jnp.bfloat16), max_concurrent_steps=steps,
                              window=100)
    module = lowered.compiler_ir("stablehlo")
    ops = [o for o in low._walk(module) if o.operation.name == "stablehlo.custom_call"
           and ir.StringAttr(o.attributes["call_target_name"]).value == low.MOSAIC_GPU]
    assert len(ops) == 1
    width = int(re.match(rf"tensor<{B}x(\d+)xi32>", str(ops[0].operands[3].type)).group(1))
    assert width % 32 == 0 and width >= 4 + P_max + ppb                # room for a walk from a page start
    m = low._mosaic_gpu_module(ops[0])
    loads = m.count("nvvm.cp.async.bulk.tensor.shared.cluster.global")
    assert loads == 2 + 2 * ppb * (steps + 1), loads
    mma = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16", m)
    assert sorted(mma) == sorted(["64"] * (Dh // 16) + [str(Dh)] * 4), mma

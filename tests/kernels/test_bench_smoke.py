"""scripts/bench_kernels.py on CPU: the --smoke run end to end (Pallas interpret mode), its timing loop,
its input rotation and its write-as-you-go JSON. No timing is asserted, only what was measured and how."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from scripts import bench_kernels as bk


def test_loop_time_runs_every_iteration_in_one_program():
    """``loop_time`` runs the step ``iters`` times per run (warm-up + repeats), carrying the data, and
    continues from the donated carry; the per-call time is positive."""
    iters, repeats = int(np.random.default_rng().integers(3, 9)), 2
    x0 = jnp.zeros((5,), jnp.float32)
    t, x = bk.loop_time(lambda i, x: x + 1.0, x0, (), iters, repeats, donate=True)
    assert t > 0 and np.array_equal(np.asarray(x), np.full(5, iters * (repeats + 1), np.float32))
    t, c = bk.loop_time(lambda i, c, a: c + a[i % 2], jnp.float32(0), (jnp.asarray([1.0, 10.0]),), 4, 1)
    assert float(c) == 22.0                                           # not donated: each run restarts


def _multiplies(body, x):
    """How many multiplies XLA keeps in a compiled fori_loop of ``body`` over ``x``."""
    import jax
    run = jax.jit(lambda x: jax.lax.fori_loop(0, 4, body, x))
    return run.lower(x).compile().as_text().count("multiply(")


def test_copy_pass_is_not_optimised_away():
    """The copy-bandwidth loop must keep its pass: a multiply survives XLA. Positive control: the
    factor bench_decode once used (1.0001 in bf16, which rounds to 1) is deleted, and that empty
    loop reported 52 TB/s on an H200."""
    n = int(np.random.default_rng().integers(1000, 5000))
    assert _multiplies(bk.copy_pass, jnp.ones((n,), jnp.float32)) >= 1
    assert _multiplies(lambda i, a: a * 1.0001, jnp.ones((n,), jnp.bfloat16)) == 0
    assert bk.copy_bandwidth(1 << 16, 2, 1) > 0


def test_rotation_spans_more_than_twice_the_l2():
    rng = np.random.default_rng()
    for _ in range(20):
        per, l2 = int(rng.integers(1, 2**27)), int(rng.integers(2**20, 2**27))
        r = bk.rotation_sets(per, l2)
        assert r >= 1 and (r * per > 2 * l2 or r == bk.MAX_SETS[0])
        assert r == 1 or (r - 1) * per <= 2 * l2                    # no more sets than needed
    assert bk.rotation_sets(2**30, 60 * 2**20) == 1                  # B=64 L=2048-sized sets: one is enough


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "kernels.json"
    doc = bk.main(["--smoke", "--output", str(out)])
    return doc, json.loads(out.read_text())


def test_smoke_runs_every_section_and_checks_before_timing(smoke):
    """Every section measured, every Ferry kernel correct before it was timed, rotation on, the
    comparisons recorded (a time, or "unavailable: reason": cuDNN has no CPU path), JSON = result."""
    doc, saved = smoke
    assert saved == json.loads(json.dumps(doc))
    assert saved["sections_done"] == list(bk.SECTIONS) and saved["smoke"] and saved["copy_GBps"] > 0
    [pa] = saved["paged_attention"]
    assert pa["rotation_sets"] >= 2 and pa["rotation_bytes"] > 2 * saved["l2_mb"] * 2**20
    assert all(c["ok"] and c["rel_err"] < 2e-2 and c["us"] > 0 for c in pa["ferry_configs"])
    assert pa["ferry_us"] > 0 and pa["xla_ref_us"] > 0 and pa["loop_overhead_us"] > 0 and pa["xla_ref_rel_err"] < 2e-2
    for name in ("jax_deprecated", "cudnn"):
        assert (pa[f"{name}_us"] or 0) > 0 or pa[f"{name}_error"].startswith(("unavailable: ", "wrong result"))
    assert pa["cudnn_us"] is None and pa["cudnn_error"].startswith("unavailable: ")
    assert pa["ferry_mosaic_gpu_rel_err"] < 2e-2 and pa["ferry_mosaic_gpu_us"] > 0      # Mosaic GPU interpret mode
    [pf] = saved["prefill_attention"]
    assert pf["ferry_rel_err"] < 2e-2 and pf["ferry_us"] > 0 and pf["xla_ref_us"] > 0 and pf["rotation_sets"] >= 2
    for kv in saved["kv_write"]:
        assert all(c["ok"] and c["us"] > 0 for c in kv["ferry_configs"]) and kv["xla_ref_us"] > 0
    for nz in saved["compaction"]:
        assert nz["ok"] and nz["jnp_nonzero_ok"] and nz["ferry_us"] > 0 and nz["rotation_sets"] >= 2


def test_json_is_written_after_each_section(tmp_path, monkeypatch):
    """A run that dies in a later section (a timeout in gpu_checks.sh) leaves the finished ones on disk."""
    out = tmp_path / "k.json"

    def dies(*a, **k):
        raise RuntimeError("killed by timeout")

    monkeypatch.setattr(bk, "bench_compaction", dies)
    with pytest.raises(RuntimeError, match="killed"):
        bk.main(["--smoke", "--sections", "prefill,compaction", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved["sections_done"] == ["prefill"] and len(saved["prefill_attention"]) == 1
    assert saved["compaction"] == [] and saved["copy_GBps"] > 0


def test_decode_roofline_per_batch():
    """scripts/bench_decode.py --shape: roofline at batch B = B * bandwidth / weight bytes per step (an
    untied embedding table is not read whole; a tied one is, as the LM head), fraction = decode rate / it."""
    from scripts.bench_decode import add_roofline, weight_bytes_per_step
    rng = np.random.default_rng()
    V, D = int(rng.integers(10, 50)), int(rng.integers(2, 9))
    layer = {"w": np.zeros((D, D), np.float32)}
    untied = {"embed": np.zeros((V, D), np.float32), "lm_head": np.zeros((D, V), np.float32), "layer_0": layer}
    tied = {"embed": np.zeros((V, D), np.float32), "layer_0": layer}
    assert weight_bytes_per_step(untied) == weight_bytes_per_step(tied) == 4 * (V * D + D * D)
    result = {"rows": [{"batch": b, "ferry": {"decode_tok_s": 50.0 * b}} for b in (1, 16, 64)]}
    add_roofline(result, bw=1000.0, weight_bytes=10)
    assert [r["roofline_tok_s"] for r in result["rows"]] == [100.0, 1600.0, 6400.0]
    assert [r["roofline_fraction"] for r in result["rows"]] == [0.5, 0.5, 0.5]
    assert result["roofline_fraction_batch1"] == 0.5 and result["copy_bandwidth_gbs"] == 1e-6

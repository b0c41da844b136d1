"""Safe start (kernels/selection.py): every op resolves to "pallas" or "reference" once; on a GPU/TPU
backend a Pallas kernel that raises, or returns wrong / non-finite values, on fresh small inputs is
replaced by its reference with one WARNING on logger "ferry", and healthy kernels are kept.

The failure path runs on this CPU host by passing ``backend="gpu"``: the self-check then runs the
kernels through their dispatchers in Pallas interpret mode, exactly as the engine would call them.
"""
import dataclasses
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from ferry.kernels import (compaction_pallas, kv_write_pallas, paged_attention_pallas,
                           prefill_attention_pallas)
from ferry.kernels.paged_attention import paged_attention
from ferry.kernels.selection import (OPS, PAGED_ATTENTION_MOSAIC_GPU, CheckShape, KernelChoice, OpSpec, choose_kernels,
                                    main)

NAMES = [s.name for s in OPS]


def _seed():
    return int(np.random.SeedSequence().entropy % 2**31)


def _warnings(caplog):
    return [r for r in caplog.records if r.name == "ferry" and r.levelno >= logging.WARNING]


def test_reference_and_cpu_choices_without_self_check(caplog):
    """No kernel runs: "reference" everywhere, "auto" on CPU = references, "auto" on TPU = only decode
    attention has a Pallas (Mosaic TPU) lowering, "pallas" = every kernel; no warnings."""
    caplog.set_level(logging.INFO, logger="ferry")
    ref = choose_kernels("reference")
    assert [o.impl for o in ref.ops] == ["reference"] * len(OPS) and [o.name for o in ref.ops] == NAMES
    cpu = choose_kernels("auto", backend="cpu")
    assert all(cpu.impl(n) == "reference" for n in NAMES) and cpu.backend == "cpu"
    tpu = choose_kernels("auto", backend="tpu", self_check=False)
    assert {n: tpu.impl(n) for n in NAMES} == {"paged_attention": "pallas", "prefill_attention": "reference",
                                               "kv_write": "reference", "compaction": "reference"}
    assert "not self-checked" in tpu.reason("paged_attention")
    forced = choose_kernels("pallas", backend="cpu")            # CPU: interpret mode, never self-checked
    assert all(forced.impl(n) == "pallas" for n in NAMES) and all(o.check_s is None for o in forced.ops)
    assert _warnings(caplog) == []
    with pytest.raises(ValueError, match="attn_impl"):
        choose_kernels("triton")
    with pytest.raises(KeyError, match="ragged"):
        ref.impl("ragged_paged_attention")


@pytest.mark.parametrize("shape", [CheckShape(), CheckShape(q_heads=9, kv_heads=3, head_dim=80, page_size=32,
                                                            dtype=jnp.float32, soft_cap=30.0)],
                         ids=["bf16-gqa4", "f32-gqa3-dh80-cap"])
def test_healthy_kernels_are_kept(caplog, shape):
    """Positive control: on a GPU backend every healthy kernel passes its self-check (fresh inputs) and
    is kept, with no warning; the summary is one line naming every op and its choice."""
    caplog.set_level(logging.INFO, logger="ferry")
    choice = choose_kernels("auto", backend="gpu", shape=shape, seed=_seed())
    assert [(o.name, o.impl) for o in choice.ops] == [(n, "pallas") for n in NAMES], choice.summary()
    assert all(o.reason.startswith("self-check ok") and o.check_s > 0 for o in choice.ops)
    assert choice.fallbacks == () and _warnings(caplog) == []
    line = choice.summary()
    assert "\n" not in line and all(f"{n}=pallas" in line for n in NAMES) and "gpu" in line


def _raising(*a, **k):
    raise RuntimeError("Triton compilation failed: out of shared memory")


def _drop_row(orig):
    def wrong(*a, **k):                                   # a plausible bug: one row never written
        out = orig(*a, **k)
        return out.at[0].set(0)
    return wrong


def _miss_one_write(orig):
    def wrong(kc, vc, layer, k, v, slots, **kw):          # the first token's K is not written
        return orig(kc, vc, layer, k.at[0].set(0), v, slots, **kw)
    return wrong


def _bad_tail(orig):
    def wrong(x, **kw):
        idx, count = orig(x, **kw)
        return idx.at[..., -1].set(-7), count
    return wrong


@pytest.mark.parametrize("broken,module,attr,make,expect", [
    ("paged_attention", paged_attention_pallas, "paged_attention", lambda o: _raising, "RuntimeError: Triton"),
    ("paged_attention", paged_attention_pallas, "paged_attention", _drop_row, "relative error"),
    ("prefill_attention", prefill_attention_pallas, "prefill_attention", lambda o: _raising, "out of shared memory"),
    ("prefill_attention", prefill_attention_pallas, "prefill_attention", _drop_row, "relative error"),
    ("kv_write", kv_write_pallas, "write_kv", _miss_one_write, "elements differ"),
    ("compaction", compaction_pallas, "nonzero", _bad_tail, "elements differ"),
], ids=["decode-raises", "decode-wrong", "prefill-raises", "prefill-wrong", "kvwrite-wrong", "compaction-wrong"])
def test_failing_kernel_falls_back_to_reference(caplog, monkeypatch, broken, module, attr, make, expect):
    """A kernel (patched in its own module, so the dispatcher the engine calls runs the broken one)
    that raises or disagrees is replaced by its reference, with exactly one WARNING on "ferry"
    naming the op and the reason; every other op keeps its (healthy) kernel."""
    caplog.set_level(logging.INFO, logger="ferry")
    monkeypatch.setattr(module, attr, make(getattr(module, attr)))
    choice = choose_kernels("auto", backend="gpu", seed=_seed())
    assert choice.impl(broken) == "reference"
    assert choice.reason(broken).startswith("self-check failed") and expect in choice.reason(broken)
    assert choice.fallbacks == (broken,)
    assert all(choice.impl(n) == "pallas" for n in NAMES if n != broken), choice.summary()
    [w] = _warnings(caplog)
    assert broken in w.getMessage() and "XLA reference" in w.getMessage() and expect in w.getMessage()
    assert f"{broken}=reference (self-check failed" in choice.summary()


def test_non_finite_output_falls_back():
    """NaN out of a kernel fails even where the reference is NaN-free elsewhere (the rel. error is inf)."""
    spec = OPS[0]
    bad = dataclasses.replace(spec, pallas=lambda i: spec.reference(i) * jnp.nan)
    choice = choose_kernels("pallas", backend="gpu", ops=(bad,), seed=_seed())
    assert choice.impl(spec.name) == "reference" and "relative error inf" in choice.reason(spec.name)


def test_a_new_op_is_one_table_entry():
    """The ragged attention op of the engine-loop issue will be one more ``OpSpec``: here a toy op with
    a healthy and a broken kernel, next to the real decode entry."""
    def inputs(rng, shape):
        return dict(x=jnp.asarray(rng.standard_normal((5, shape.head_dim)), jnp.float32))

    ok = OpSpec("toy", ("gpu",), lambda i: i["x"] * 2.0, lambda i: i["x"] + i["x"], inputs, 1e-6)
    bad = dataclasses.replace(ok, name="toy_bad", pallas=lambda i: i["x"] * 2.1)
    choice = choose_kernels("auto", backend="gpu", ops=(OPS[0], ok, bad), seed=_seed())
    assert isinstance(choice, KernelChoice) and [o.name for o in choice.ops] == ["paged_attention", "toy", "toy_bad"]
    assert (choice.impl("paged_attention"), choice.impl("toy"), choice.impl("toy_bad")) == ("pallas", "pallas", "reference")
    cpu = choose_kernels("auto", backend="tpu", ops=(ok,), self_check=True)
    assert cpu.impl("toy") == "reference" and "no Pallas lowering" in cpu.reason("toy")


def test_choice_drives_the_dispatchers(monkeypatch):
    """The engine's wiring: ``impl=choice.impl(op)`` goes to the op's dispatcher. After a fallback the
    broken kernel is never called again (the dispatcher runs the reference); a kept kernel is called."""
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr(paged_attention_pallas, "paged_attention", broken)
    choice = choose_kernels("auto", backend="gpu", ops=OPS[:1], seed=_seed())
    assert choice.impl("paged_attention") == "reference" and calls == [1]
    i = OPS[0].make_inputs(np.random.default_rng(_seed()), CheckShape(dtype=jnp.float32))
    args = (i["q"], i["k_cache"], i["v_cache"], i["layer"], i["block_tables"], i["seq_lens"])
    got = paged_attention(*args, scale=i["scale"], impl=choice.impl("paged_attention"))
    want = paged_attention(*args, scale=i["scale"], impl="reference")
    assert calls == [1] and np.array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(RuntimeError, match="boom"):                   # positive control: "pallas" calls it
        paged_attention(*args, scale=i["scale"], impl="pallas")


def test_cli_prints_the_choice(tmp_path, capsys):
    """``python -m ferry.kernels.selection`` (the self-check step of gpu_checks.sh): one line per shape and
    one per op, and the JSON file."""
    import json
    out = tmp_path / "sel.json"
    assert main(["--no-self-check", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("kernels (cpu, attn_impl=auto)") == 2 and all(n in text for n in NAMES)
    data = json.loads(out.read_text())
    assert [o["impl"] for o in data["choices"][0]["ops"]] == ["reference"] * len(OPS)


def test_mosaic_gpu_variant_is_opt_in_and_self_checked(caplog, monkeypatch):
    """The Mosaic GPU decode variant is not in the default table; added to it, it is self-checked like
    any op (Mosaic GPU interpret mode on this host): kept when healthy, replaced when it raises."""
    pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    assert PAGED_ATTENTION_MOSAIC_GPU.name not in NAMES
    caplog.set_level(logging.INFO, logger="ferry")
    choice = choose_kernels("auto", backend="gpu", ops=(PAGED_ATTENTION_MOSAIC_GPU,), seed=_seed())
    assert choice.impl("paged_attention_mosaic_gpu") == "pallas" and _warnings(caplog) == []
    from ferry.kernels import paged_attention_mosaic_gpu
    monkeypatch.setattr(paged_attention_mosaic_gpu, "paged_attention", _raising)
    choice = choose_kernels("auto", backend="gpu", ops=(PAGED_ATTENTION_MOSAIC_GPU,), seed=_seed())
    assert choice.impl("paged_attention_mosaic_gpu") == "reference" and len(_warnings(caplog)) == 1

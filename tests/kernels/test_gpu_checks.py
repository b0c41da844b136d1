"""scripts/gpu_checks.sh and scripts/gpu_summary.py on a CPU host: the GPU guard (and, with a stand-in
``python`` that reports a GPU, the steps it guards), the per-step budget, the summary table, and the
device image's missing packages (gguf, fastapi, uvicorn) never imported by the GPU scripts."""
import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = ["selfcheck", "engine_parity", "kernels_attention", "cost_model_llama-3-8b", "decode_llama-3.2-1b",
         "kernels_compaction", "sampling", "kernels_kv_write", "kernels_prefill", "decode_llama-3-8b",
         "decode_variant_k1", "decode_variant_k32", "decode_variant_xla_attention", "decode_variant_while_graphs"]


def _run(tmp_path, env_extra=None, path_prefix=None):
    env = dict(os.environ, OUT=str(tmp_path / "out"), JAX_PLATFORMS="cpu", **(env_extra or {}))
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_checks.sh")], env=env, capture_output=True,
                          text=True, timeout=300)


def test_exits_at_once_without_a_gpu(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 2 and "not a GPU" in r.stderr and "'cpu'" in r.stderr
    out = tmp_path / "out"
    assert (out / "steps.txt").read_text() == "" and not list(out.glob("*.json"))


@pytest.fixture
def fake_gpu_python(tmp_path):
    """A ``python3`` on PATH that answers the GPU probes with "gpu", records every other call (the steps)
    and runs gpu_summary.py for real."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls.txt"
    script = bindir / "python3"
    script.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *default_backend*) echo gpu ;;
  *device_kind*) echo fake_h200 ;;
  *__version__*) echo "jax fake" ;;
  *gpu_summary.py*) exec {sys.executable} "$@" ;;
  *) echo "$*" >> {calls} ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bindir, calls


def test_with_a_gpu_every_step_runs_in_order_then_the_summary(tmp_path, fake_gpu_python):
    """Positive control for the guard: past it, each step runs once in priority order with its output
    file under $OUT named after the GPU, steps.txt records rc 0, and the summary table is printed."""
    bindir, calls = fake_gpu_python
    r = _run(tmp_path, path_prefix=bindir)
    assert r.returncode == 0, r.stderr
    lines = calls.read_text().splitlines()
    assert len(lines) == len(STEPS)
    assert lines[0].startswith("-m ferry.kernels.selection") and "selection_fake_h200.json" in lines[0]
    assert "gpu_engine_parity.py" in lines[1] and "--sections attention" in lines[2] and "--shape llama-3-8b" in lines[9] and "--no-hf" in lines[9]
    assert "profile_cost_model.py" in lines[3] and "random:llama-3-8b" in lines[3]
    assert "--decode-steps 1 " in lines[10] and "--attn-impl reference" in lines[12] and "decode_variant_while_graphs" in lines[13]
    assert all(str(tmp_path / "out") in ln for ln in lines)
    steps = [ln.split() for ln in (tmp_path / "out" / "steps.txt").read_text().splitlines()]
    assert [s[0] for s in steps] == STEPS and all(s[1] == "0" for s in steps)
    assert "measurement" in r.stdout and "MISSING" in r.stdout and (tmp_path / "out" / "summary.txt").exists()


def test_steps_past_the_budget_are_skipped(tmp_path, fake_gpu_python):
    bindir, calls = fake_gpu_python
    r = _run(tmp_path, {"GPU_CHECKS_BUDGET": "10"}, path_prefix=bindir)
    assert r.returncode == 0 and not calls.exists()
    steps = [ln.split() for ln in (tmp_path / "out" / "steps.txt").read_text().splitlines()]
    assert [s[0] for s in steps] == STEPS and all(s[1] == "skipped" for s in steps)


def test_only_selected_steps_run_and_results_are_packed(tmp_path, fake_gpu_python):
    """GPU_CHECKS_ONLY runs the named steps alone; GPU_CHECKS_PACK gets one tar of $OUT and the log."""
    import tarfile
    bindir, calls = fake_gpu_python
    pack = tmp_path / "pack"
    r = _run(tmp_path, {"GPU_CHECKS_ONLY": "sampling decode_llama-3-8b", "GPU_CHECKS_PACK": str(pack)},
             path_prefix=bindir)
    assert r.returncode == 0, r.stderr
    lines = calls.read_text().splitlines()
    assert len(lines) == 2 and "bench_sampling.py" in lines[0] and "--shape llama-3-8b" in lines[1]
    steps = dict(ln.split()[:2] for ln in (tmp_path / "out" / "steps.txt").read_text().splitlines())
    assert steps["sampling"] == "0" and steps["selfcheck"] == "not_selected" and len(steps) == len(STEPS)
    assert sorted(p.name for p in pack.iterdir()) == ["gpu_checks.log", "gpu_results.tar", "summary.txt"]
    with tarfile.open(pack / "gpu_results.tar") as t:
        assert {"./steps.txt", "./summary.txt", "./gpu_checks.log"} <= set(t.getnames())


def test_summary_puts_targets_beside_measurements(tmp_path):
    """PASS / FAIL / MISSING against the issue's targets from hand-written result files."""
    sys.path.insert(0, str(ROOT))
    from scripts.gpu_summary import lines, main
    (tmp_path / "kernels_attention_x.json").write_text(json.dumps({"copy_GBps": 4000, "paged_attention": [
        {"B": 64, "L": 2048, "ferry_frac_of_copy_bw": 0.83, "ferry_GBps": 3320},
        {"B": 8, "L": 2048, "ferry_over_jax_deprecated": 1.5},
        {"B": 1, "L": 4096, "ferry_over_floor": 2.6, "ferry_net_over_floor": 1.5,
         "cudnn_error": "unavailable: no cuDNN"}]}))
    (tmp_path / "kernels_compaction_x.json").write_text(json.dumps({"compaction": [
        {"n": 1 << 24, "speedup": 12.0, "ferry_over_floor": 2.5, "ferry_net_over_floor": 2.2}]}))
    (tmp_path / "decode_llama-3.2-1b_x.json").write_text(json.dumps({"shape": "llama-3.2-1b", "rows": [
        {"batch": 1, "ferry": {"decode_tok_s": 1000.0}, "roofline_fraction": 0.9, "roofline_tok_s": 1111}]}))
    (tmp_path / "engine_parity_x.json").write_text(json.dumps({"identical": 5, "prompts": 6, "model": "m"}))
    (tmp_path / "cost_model_x.json").write_text(json.dumps({"model": "cm", "base": 0.012, "decode_base": 0.004}))
    (tmp_path / "decode_variant_k1_x.json").write_text(json.dumps({"shape": "llama-3.2-1b", "decode_steps": 1, "attn_impl": "auto", "rows": [
        {"batch": 1, "ferry": {"decode_tok_s": 10.0}, "roofline_fraction": 0.01}]}))
    (tmp_path / "selection_x.json").write_text(json.dumps({"choices": [{"shape": {"q_heads": 8}, "ops": [
        {"name": "compaction", "impl": "reference", "reason": "self-check failed: boom"}]}]}))
    st = {x.what: x.status for x in lines(str(tmp_path))}
    assert st["paged attn B=64 L=2048, fraction of copy BW"] == "PASS"
    assert st["paged attn B=8 L=2048, speed-up over JAX deprecated"] == "FAIL"
    assert st["paged attn B=1 L=4096, time over bandwidth floor"] == "FAIL"
    assert st["paged attn B=1 L=4096, same net of loop overhead"] == "PASS"
    assert st["compaction n=2^24, speed-up over jnp.nonzero"] == "PASS"
    assert st["compaction n=2^24, time over bandwidth floor"] == "FAIL"
    assert st["compaction n=2^24, same net of loop overhead"] == "FAIL"
    assert st["decode Llama-3.2-1B bf16 batch 1, fraction of roofline"] == "PASS"
    assert any(k.startswith("self-check") and v == "FAIL" for k, v in st.items())
    assert st["engine greedy tokens, Pallas vs reference (m)"] == "FAIL"
    measured = {x.what: x.measured for x in lines(str(tmp_path))}
    assert measured["cost model cm: decode_base"] == 4.0
    assert measured["decode variant llama-3.2-1b K=1 attn=auto batch 1 (1.0% of roofline)"] == 10.0
    assert st["decode Llama-3.2-1B bf16 batch 1, fraction of roofline"] == "PASS"      # not the variant's row
    assert main([str(tmp_path), "--json", str(tmp_path / "s.json")]) == 0
    assert any("unavailable: no cuDNN" in x["what"] for x in json.loads((tmp_path / "s.json").read_text()))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert all(x.status == "MISSING" for x in lines(str(empty)))


def test_gpu_scripts_do_not_import_packages_missing_on_the_device():
    """The device image has no gguf / fastapi / uvicorn: importing every module the GPU steps use
    (scripts, selection, the engine's Python API on random weights, sampling) with those blocked."""
    code = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('gguf', 'fastapi', 'uvicorn', 'starlette'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import scripts.bench_kernels, scripts.bench_decode, scripts.gpu_engine_parity, scripts.bench_sampling, scripts.gpu_summary, scripts.profile_cost_model
import ferry.kernels.selection, ferry.engine.sampling, ferry.engine.llm_engine, ferry.models.random_weights
from ferry import LLM, SamplingParams
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-2000:]
    blocked = subprocess.run([sys.executable, "-c", code + "import gguf\n"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert blocked.returncode != 0 and "blocked: gguf" in blocked.stderr              # positive control


def test_engine_parity_tells_a_near_tie_from_a_bug():
    """A difference whose reference top-2 gap is within twice the engines' disagreement over the
    shared prefix is a near tie; a wide gap is not (the positive control)."""
    import random
    from types import SimpleNamespace as NS
    sys.path.insert(0, str(ROOT))
    from scripts.gpu_engine_parity import compare
    from ferry.engine.outputs import TokenLogprob

    def out(tokens, lps, gap):
        return NS(token_ids=tokens, logprobs=[TokenLogprob(t, lp, ((t, lp), (t + 1, lp - gap)))
                                               for t, lp in zip(tokens, lps)])
    eps = random.uniform(1e-5, 1e-3)
    ref = out([5, 6, 7], [-1.0, -2.0, -3.0], eps)
    same = compare(3, out([5, 6, 7], [-1.0, -2.0 + eps, -3.0], 0.5), ref)
    assert same["identical"] and same["first_difference"] is None and "near_tie" not in same
    tie = compare(3, out([5, 6, 8], [-1.0, -2.0 + eps, -3.0], 0.5), ref)
    assert tie["first_difference"] == 2 and tie["near_tie"] and tie["max_prefix_logprob_diff"] == pytest.approx(eps)
    wide = compare(3, out([5, 6, 8], [-1.0, -2.0 + eps, -3.0], 0.5), out([5, 6, 7], [-1.0, -2.0, -3.0], 1.0))
    assert not wide["near_tie"] and wide["reference_gap"] == 1.0

"""Start-up time as a user meets it: ``ferry generate`` cold and warm, ``ferry serve`` to ready.

usage: python scripts/bench_startup.py [--prompt TEXT] [--output benchmarks/results/startup_cpu_2core.json]
           [--baseline-rev REV [--rounds N]]

Each run is a fresh process, timed by wall clock from launch:
* generate cold: empty compilation and model caches (a fresh install: the GGUF is parsed and
  cached, the programs the prompt needs are compiled);
* generate warm: the same command again (model from its cache, programs from JAX's persistent
  compilation cache);
* serve cold / warm: ``ferry serve`` until ``GET /health`` answers 200 (every bucket program
  compiled up front), with an empty compilation cache, then again with it filled.
The default model; caches live in a temporary directory, so nothing of the user's is touched.
``--baseline-rev REV`` adds ``ferry serve`` cold starts of git revision REV and of this tree,
alternating for ``--rounds`` rounds in the same run (the VM's speed drifts by 10-20% over an
hour, so only a side-by-side ratio compares two revisions).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import machine, write_json  # noqa: E402


def _ferry(tree: str | None) -> tuple[list[str], dict]:
    """The ``ferry`` command: installed, or run from the source tree ``tree``."""
    if tree is None:
        return ["ferry"], dict(os.environ)
    return ([sys.executable, "-c", "from ferry.engine.entrypoints.cli import main; main()"],
            dict(os.environ, PYTHONPATH=tree))


def _generate(prompt: str, cache: str) -> dict:
    cmd = ["ferry", "generate", prompt, "-v", "--compile-cache-dir", os.path.join(cache, "jax"),
           "--model-cache-dir", os.path.join(cache, "models")]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    detail = [ln for ln in r.stderr.splitlines() if ln.startswith("[")]
    return {"wall_s": round(wall, 2), "text": r.stdout.strip(), "detail": detail[-1] if detail else ""}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cache: str, tree: str | None = None) -> dict:
    port = _free_port()
    exe, env = _ferry(tree)
    cmd = exe + ["serve", "--port", str(port), "--compile-cache-dir", os.path.join(cache, "jax"),
           "--model-cache-dir", os.path.join(cache, "models"), "--log-level", "warning"]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=tempfile.gettempdir())
    try:
        while True:
            if p.poll() is not None:
                raise RuntimeError(p.stderr.read()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t > 1800:
                raise TimeoutError("ferry serve not ready after 30 minutes")
            time.sleep(0.25)
        return {"ready_s": round(time.perf_counter() - t, 2)}
    finally:
        p.terminate()
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


def _side_by_side(rev: str, rounds: int, root: str) -> dict:
    from baseline import alternate
    out: dict = {"baseline_rev": rev, "baseline": [], "now": []}
    for name, tree in alternate(rev, rounds):
        cache = os.path.join(root, f"ab-{name}-{len(out[name])}")
        out[name].append(_serve(cache, tree)["ready_s"])
        shutil.rmtree(cache, ignore_errors=True)
        print(f"serve cold, {name}:", out[name][-1], flush=True)
    out["baseline_over_now"] = round(sum(out["baseline"]) / sum(out["now"]), 3)
    print("serve cold, baseline / now:", out["baseline_over_now"], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--output", default=None)
    ap.add_argument("--baseline-rev", default=None, help="also time ferry serve cold at this git revision, "
                    "alternating with this tree")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="ferry-startup-")
    res = {"command": "python scripts/bench_startup.py " + " ".join(sys.argv[1:]),
           "machine": machine(), "model": "default (SmolLM2-135M-Instruct GGUF)"}
    try:
        res["generate_cold"] = _generate(a.prompt, os.path.join(root, "g"))
        print("generate cold:", res["generate_cold"], flush=True)
        res["generate_warm"] = _generate(a.prompt, os.path.join(root, "g"))
        print("generate warm:", res["generate_warm"], flush=True)
        if not a.skip_serve:
            res["serve_cold"] = _serve(os.path.join(root, "s"))
            print("serve cold:", res["serve_cold"], flush=True)
            res["serve_warm"] = _serve(os.path.join(root, "s"))
            print("serve warm:", res["serve_warm"], flush=True)
        if a.baseline_rev:
            res["serve_cold_side_by_side"] = _side_by_side(a.baseline_rev, a.rounds, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_json(a.output, res)


if __name__ == "__main__":
    main()

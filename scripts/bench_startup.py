"""Start-up time as a user meets it: ``ferry generate`` cold and warm, ``ferry serve`` to ready.

usage: python scripts/bench_startup.py [--prompt TEXT] [--output benchmarks/results/startup_cpu_2core.json]

Each run is a fresh process, timed by wall clock from launch:
* generate cold: empty compilation and model caches (a fresh install: the GGUF is parsed and
  cached, the programs the prompt needs are compiled);
* generate warm: the same command again (model from its cache, programs from JAX's persistent
  compilation cache);
* serve cold / warm: ``ferry serve`` until ``GET /health`` answers 200 (every bucket program
  compiled up front), with an empty compilation cache, then again with it filled.
The default model; caches live in a temporary directory, so nothing of the user's is touched.
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


def _serve(cache: str) -> dict:
    port = _free_port()
    cmd = ["ferry", "serve", "--port", str(port), "--compile-cache-dir", os.path.join(cache, "jax"),
           "--model-cache-dir", os.path.join(cache, "models"), "--log-level", "warning"]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--output", default=None)
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
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_json(a.output, res)


if __name__ == "__main__":
    main()

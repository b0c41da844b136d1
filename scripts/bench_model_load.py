"""Loading the default model through the GGUF load cache, cold (empty cache: parse, dequantize,
write the entry) and warm (read the entry), each in a fresh process.

usage: python scripts/bench_model_load.py [--baseline-rev REV] [--rounds 2] [--output FILE]

``--baseline-rev``: the same at git revision REV, alternating with this tree in the same run.
Prints the seconds and writes JSON naming the machine and the command.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import machine, write_json  # noqa: E402

_CODE = ("import sys, time; t = time.perf_counter(); from ferry.models.registry import load_model; "
         "load_model(None, dtype='float32', cache_dir=sys.argv[1]); print(time.perf_counter() - t)")


def _load(tree: str, cache: str) -> float:
    r = subprocess.run([sys.executable, "-c", _CODE, cache], capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONPATH=tree), cwd=tempfile.gettempdir())
    return round(float(r.stdout.strip().splitlines()[-1]), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-rev", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    from baseline import ROOT, alternate
    res = {"command": "python scripts/bench_model_load.py " + " ".join(sys.argv[1:]), "machine": machine(),
           "model": "default (SmolLM2-135M-Instruct GGUF)", "now": {"cold_s": [], "warm_s": []}}
    if a.baseline_rev:
        res["baseline"] = {"rev": a.baseline_rev, "cold_s": [], "warm_s": []}
        trees = alternate(a.baseline_rev, a.rounds)
    else:
        trees = [("now", ROOT)] * a.rounds
    for name, tree in trees:
        cache = tempfile.mkdtemp(prefix="ferry-load-")
        res[name]["cold_s"].append(_load(tree, cache))
        res[name]["warm_s"].append(_load(tree, cache))
        print(f"{name}: cold {res[name]['cold_s'][-1]} s, warm {res[name]['warm_s'][-1]} s", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    if a.baseline_rev:
        for k in ("cold_s", "warm_s"):
            res[f"baseline_over_now_{k[:-2]}"] = round(sum(res["baseline"][k]) / sum(res["now"][k]), 2)
        print({k: v for k, v in res.items() if k.startswith("baseline_over")})
    write_json(a.output, res)


if __name__ == "__main__":
    main()

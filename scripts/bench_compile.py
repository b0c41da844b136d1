"""Compile time of every step program the engine builds, one at a time, empty compilation cache.

usage: python scripts/bench_compile.py [--model M] [--output benchmarks/results/compile_cpu_2core.json]

Builds the engine with lazy warm-up and a fresh persistent-cache directory, then compiles each
(program, bucket) of ``ModelRunner.shapes()`` alone and times it, wall clock and the process's
CPU seconds (XLA:CPU compiles one program on more than one thread, which is how much two
compile threads can gain): what ``ferry serve`` spends before ``/health`` answers, program by
program (``ferry serve`` compiles them on one thread per core). Prints a table and writes JSON
naming the machine and the command.
"""
import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_io import machine, write_json  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the SmolLM2 GGUF")
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    from ferry.engine.config import EngineConfig
    from ferry.engine.llm_engine import LLMEngine

    eng = LLMEngine(EngineConfig(model=a.model, warmup="lazy", compile_cache_dir=tempfile.mkdtemp(),
                                 warmup_progress=False))
    runner, rows = eng.runner, []
    for name, key in runner.shapes():
        t, c = time.perf_counter(), _cpu()
        runner.programs[name].get(key, runner.example_args(name, key))
        rows.append({"program": name, "bucket": list(key) if isinstance(key, tuple) else key,
                     "seconds": round(time.perf_counter() - t, 2), "cpu_seconds": round(_cpu() - c, 2)})
        print(f"{name:14s} {str(key):14s} {rows[-1]['seconds']:6.1f} s  cpu {rows[-1]['cpu_seconds']:6.1f} s",
              flush=True)
    by = {}
    for r in rows:
        by[r["program"]] = round(by.get(r["program"], 0.0) + r["seconds"], 1)
    total = round(sum(r["seconds"] for r in rows), 1)
    cpu = round(sum(r["cpu_seconds"] for r in rows), 1)
    print(f"total {total} s ({cpu} CPU-seconds) over {len(rows)} programs (one at a time): {by}")
    res = {"command": "python scripts/bench_compile.py " + " ".join(sys.argv[1:]),
           "machine": machine(),
           "model": eng.model_name, "programs": rows, "seconds_by_program": by, "total_seconds": total,
           "total_cpu_seconds": cpu}
    write_json(a.output, res)


if __name__ == "__main__":
    main()

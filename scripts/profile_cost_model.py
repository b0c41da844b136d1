"""Fit the scheduler's iteration-time model from the real engine; save it as JSON beside the model.

usage: python scripts/profile_cost_model.py [--model M] [--max-batch 16] [--output FILE] [--repeats 3]
Times prefill chunks of several lengths and decode steps at several batch sizes and contexts on
the real engine, fits ``scheduler.cost_model.CostModel`` by least squares and writes it (default:
``<model>.cost_model.json``). Use it with ``EngineConfig(cost_model=FILE)`` / ``--cost-model``.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    import jax
    from tqdm import tqdm

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.model_runner import Row
    from engine.sampling_params import SamplingParams
    from scheduler.cost_model import CostModel

    eng = LLMEngine(EngineConfig(model=a.model, max_batch=a.max_batch, max_model_len=a.max_model_len,
                                 scheduler="fcfs"))
    S, runner, sp = eng.config.page_size, eng.runner, SamplingParams(temperature=0, max_tokens=4)
    pages = list(range(1, a.max_model_len // S + 1))
    samples = []
    jobs = [("prefill", n, 0) for n in (16, 32, 64, 128, 256) if n <= eng.config.max_prefill_chunk]
    jobs += [("decode", b, ctx) for b in (1, 2, 4, 8, 16, 32, 64) if b <= a.max_batch for ctx in (64, 256)
             if ctx < a.max_model_len]
    for kind, n, ctx in tqdm(jobs, desc="profiling steps"):
        for _ in range(a.repeats + 1):
            if kind == "prefill":
                row = Row(list(range(3, 3 + n)), 0, pages, 0, (sp, 0, 0, list(range(3, 3 + n)), n, ()))
                t = time.perf_counter()
                jax.block_until_ready(runner.prefill(row).tokens)
                sample = {"prefill_tokens": n, "decode_rows": 0, "context_tokens": n}
            else:
                rows = [Row([5], ctx, pages, 0, (sp, 0, 0, [5] * (ctx + 1), ctx, ())) for _ in range(n)]
                t = time.perf_counter()
                jax.block_until_ready(runner.decode(rows).tokens)
                sample = {"prefill_tokens": 0, "decode_rows": n, "context_tokens": n * ctx}
            sample["seconds"] = time.perf_counter() - t
        samples.append(sample)                          # the last repeat (warm)
    cm = CostModel.fit(samples)
    out = a.output or f"{eng.model_name}.cost_model.json"
    with open(out, "w") as f:
        f.write(cm.to_json())
    print(cm)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

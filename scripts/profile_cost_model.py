"""Fit the scheduler's iteration-time model from the real engine; save it as JSON beside the model.

usage: python scripts/profile_cost_model.py [--model M] [--max-batch 16] [--max-model-len 512]
           [--repeats 3] [--output FILE]
Times ragged steps (a prefill chunk of every compiled length alone, and beside decode rows) and
single decode iterations at several batch sizes and contexts on the real engine (after its warm-up, so nothing compiles while timing), takes the
median of ``--repeats`` runs each (and K-step decode dispatches, reported per iteration, not fitted), fits ``scheduler.cost_model.CostModel`` by least squares (the
work padded to the engine's step and batch buckets, as the engine computes it; decode dispatches
with their own fixed cost) and writes it with
every sample beside its fitted time. Default output: ``<model file without .gguf>.cost_model.json`` beside the model
(the current directory for ``random:*`` models or a read-only model directory). Use it with
``EngineConfig(cost_model=FILE)`` / ``--cost-model FILE``.
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_io import machine, write_json  # noqa: E402


def default_output(model: str | None, name: str) -> str:
    if model is None:
        from ferry.models.registry import default_model_path
        model = default_model_path()
    if model.startswith("random:"):
        return f"{model.replace(':', '_')}.cost_model.json"
    base = model.rstrip("/")
    out = (base[:-5] if base.endswith(".gguf") else base) + ".cost_model.json"
    if os.access(os.path.dirname(os.path.abspath(out)), os.W_OK):
        return out
    return f"{name}.cost_model.json"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the SmolLM2 GGUF; random:tiny for a smoke run")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    if a.repeats < 1 or a.max_batch < 1:
        ap.error("--repeats and --max-batch must be >= 1")
    import jax
    from tqdm import tqdm

    from ferry.engine.config import EngineConfig
    from ferry.engine.llm_engine import LLMEngine
    from ferry.engine.step_inputs import StepRow
    from ferry.engine.sampling import SamplingRow
    from ferry.engine.sampling_params import SamplingParams
    from ferry.engine.slots import SlotRow
    from ferry.scheduler.cost_model import CostModel

    eng = LLMEngine(EngineConfig(model=a.model, max_batch=a.max_batch, max_model_len=a.max_model_len,
                                 scheduler="fcfs"))
    S, runner = eng.config.page_size, eng.runner
    sp = SamplingParams(temperature=0, max_tokens=eng.max_model_len - 1, ignore_eos=True)
    buckets, L = eng.config.buckets(), eng.max_model_len
    pages = list(range(1, -(-L // S) + 1))[:eng.kv.num_pages - 1]
    budget = buckets.step_tokens[-1]
    ctx_mid = min(256, L - 1)
    # (kind, prefill tokens, decode rows, decode context): chunks alone and beside decode rows in one
    # ragged step, and decode dispatches of one iteration
    shapes = [("step", n, 0, 0) for n in buckets.step_tokens if n <= L]
    shapes += [("step", n, b, ctx_mid) for n in buckets.step_tokens for b in sorted({4, a.max_batch - 1})
               if 16 <= n <= L and n + b <= budget and 0 < b < a.max_batch]      # b rows + the chunk's row
    shapes += [("decode", 0, b, ctx) for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= a.max_batch
               for ctx in sorted({min(64, L - 1), ctx_mid, L - 1})]
    # multi-step decode dispatches (K iterations, as the engine runs steady decode): reported per
    # iteration beside the fit, not fitted (the scheduler charges K single iterations)
    K = eng.config.decode_steps
    shapes += [("multi", 0, b, max(0, min(ctx_mid, L - 1 - K))) for b in buckets.decode_batch] if K > 1 else []
    samples = []
    for kind, n, b, ctx in tqdm(shapes, desc="profiling steps"):
        times = []
        for _ in range(a.repeats + 1):                     # the first run is discarded (cache warm-up)
            # b slots at position ctx over the same pages
            nslots = b + (kind == "step")                   # a step's chunk samples into one more slot
            slots = [eng.slots.bind(f"p{i}", set()) for i in range(nslots)]
            for i, s in enumerate(slots):
                eng.slots.write(s, SlotRow(f"p{i}", 5, ctx, pages, SamplingRow(sp, 0, 0)), None)
            runner.apply_updates(*eng.slots.take_updates())
            t = time.perf_counter()
            if kind == "step":
                rows = [StepRow(ctx, 1, pages, None, s) for s in slots[:b]]
                rows.append(StepRow(0, n, pages, list(range(3, 3 + n)), slots[b]))
                jax.block_until_ready(runner.step(rows)[0].tokens)
            else:
                steps = K if kind == "multi" else 1
                jax.block_until_ready(runner.decode(slots[:b], ctx, steps).tokens)
            times.append((time.perf_counter() - t) / (K if kind == "multi" else 1))
            for i in range(nslots):
                eng.slots.release(f"p{i}")
        sample = {"prefill_tokens": n, "decode_rows": b, "context_tokens": n + b * ctx}
        if kind == "multi":
            sample["decode_steps"] = K
        samples.append({**sample, "seconds": statistics.median(times[1:])})
    if eng.guard.violations:
        print(f"warning: {eng.guard.violations} compilations while profiling; timings include them")
    fitted = [s for s in samples if "decode_steps" not in s]
    cm = CostModel.fit(fitted, buckets.step_tokens, buckets.decode_batch, decode_base=True)
    flat = CostModel.fit(fitted)                        # one base, work not padded: for comparison
    print(f"{'prefill':>8} {'rows':>5} {'context':>8} {'measured ms':>12} {'fitted ms':>10} {'unpadded fit':>13}"
          "  (K: per iteration of a K-step decode, not fitted)")
    for s in samples:
        s["fitted_seconds"] = cm.iteration_time(s["prefill_tokens"], s["decode_rows"], s["context_tokens"])
        s["unpadded_fit_seconds"] = flat.iteration_time(s["prefill_tokens"], s["decode_rows"], s["context_tokens"])
        print(f"{s['prefill_tokens']:>8} {s['decode_rows']:>5} {s['context_tokens']:>8} {1e3 * s['seconds']:12.1f} "
              f"{1e3 * s['fitted_seconds']:10.1f} {1e3 * s['unpadded_fit_seconds']:13.1f}"
              + (f"  K={s['decode_steps']}" if "decode_steps" in s else ""))
    out = a.output or default_output(a.model, eng.model_name)
    print(cm)
    # CostModel.load reads the coefficients and bucket tables and ignores the rest
    write_json(out, {**dataclasses.asdict(cm), "samples": samples, "model": eng.model_name, "machine": machine(),
                     "platform": jax.default_backend(),
                     "command": "python scripts/profile_cost_model.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()

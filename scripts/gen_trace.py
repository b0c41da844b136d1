"""Write a serving trace (JSONL: arrival, prompt_len, output_len) with heavy-tailed lengths.

usage: python scripts/gen_trace.py OUT.jsonl [--jobs 2000] [--load 0.9] [--arrival gamma|poisson] [--cv 2]
           [--alpha 0.8] [--out-max 2048] [--prompt-median 64] [--max-batch 32] [--cost-model gpu|cpu|FILE]
           [--rate JOBS_PER_S] [--seed 0] [--hint-sigma S]
``--hint-sigma``: every job also gets a ``length_hint`` (its output length with log-normal error of that
sigma: a stand-in for a length predictor; the MLFQ ranks by it, ``workload.add_length_hints``).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ferry.scheduler.cost_model import CostModel  # noqa: E402
from ferry.scheduler.workload import add_length_hints, generate, write_jsonl  # noqa: E402

# The simulator's GPU profile: the fit on an H200 of the engine with random weights of Llama-3-8B's
# shape, batch 32, bf16 (benchmarks/results/gpu/cost_model_llama-3-8b_nvidia_h200.json; a test keeps
# the two equal). Decode is nearly flat in batch size: a dispatch's fixed cost (7.9 ms, about 4 ms of
# it host overhead) dwarfs a row's 37 us. per_swap_page is NOT measured: one 16-token page of that
# shape is 2 MiB, estimated at 40 us over the host link. Before this fit the profile was assumed
# (base 12 ms, prefill 40 us/token, row 100 us, context 2e-8 s/token; sweep results say which).
GPU = CostModel(base=9.38e-3, decode_base=7.91e-3, per_prefill_token=1.45e-5, per_decode_row=3.70e-5,
                per_context_token=1.21e-8, per_swap_page=4e-5, token_buckets=(16, 64, 256), row_buckets=(1, 4, 16, 32))


def cost_model(spec: str) -> CostModel:
    return {"gpu": GPU, "cpu": CostModel.cpu_default()}.get(spec) or CostModel.load(spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--load", type=float, default=0.9)
    ap.add_argument("--arrival", choices=["gamma", "poisson"], default="gamma")
    ap.add_argument("--cv", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.8, help="Pareto tail index of output lengths")
    ap.add_argument("--out-min", type=int, default=8)
    ap.add_argument("--out-max", type=int, default=2048)
    ap.add_argument("--prompt-median", type=int, default=64)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--cost-model", default="gpu")
    ap.add_argument("--rate", type=float, default=None, help="jobs/s (overrides --load)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hint-sigma", type=float, default=None, help="add length hints with this log-normal error")
    a = ap.parse_args()
    jobs = generate(a.jobs, load=a.load, arrival=a.arrival, cv=a.cv, prompt_median=a.prompt_median,
                    prompt_max=a.prompt_max, out_min=a.out_min, out_max=a.out_max, alpha=a.alpha,
                    max_batch=a.max_batch, cost=cost_model(a.cost_model), rate=a.rate, seed=a.seed)
    if a.hint_sigma is not None:
        jobs = add_length_hints(jobs, a.hint_sigma, a.seed)
    write_jsonl(a.out, jobs)
    print(f"wrote {len(jobs)} jobs to {a.out} (last arrival {jobs[-1]['arrival']:.1f} s)")


if __name__ == "__main__":
    main()

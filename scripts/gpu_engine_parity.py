"""The whole engine on a GPU, Pallas kernels against XLA references: greedy tokens side by side.

    python scripts/gpu_engine_parity.py --output parity.json

Two engines on the same random weights (``random:tiny``, float32, drawn with one seed), one with
``attn_impl="pallas"`` and one with ``attn_impl="reference"``, generate greedily for prompts of
mixed lengths (several prefill chunks, ragged batches). Reports, per prompt, whether the tokens
are identical and where they first differ; at a difference, whether it is a near tie: the
reference's gap between its top two log-probabilities there is at most twice the largest
disagreement of the two engines' log-probabilities over the shared prefix (the same contexts), so
rounding the engines already show elsewhere can flip it (f32 matmuls on a GPU run as TF32 by
default). A difference that is not a near tie is a bug. The kernel self-check compares each kernel alone; this
checks them composed in the engine's programs (paging, chunked prefill, multi-step decode). On
CPU the Pallas engine runs in interpret mode (slow; ``--smoke`` shrinks the run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def run(attn_impl: str, prompts: list[list[int]], new_tokens: int) -> tuple[list, dict]:
    """Each prompt's ``RequestOutput`` (greedy, top-2 log-probabilities per token) and the engine's
    warm-up time and kernel choices."""
    from ferry import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(model="random:tiny", dtype="float32", attn_impl=attn_impl, max_batch=4, max_model_len=256,
              max_prefill_chunk=64, seed=7)
    warm = time.perf_counter() - t0
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                                                logprobs=2))
    return outs, {"warmup_seconds": warm, "kernels": llm.engine.kernels.as_dict()}


def compare(prompt_len: int, got, ref) -> dict:
    """One prompt's row: tokens side by side, the first difference and whether it is a near tie."""
    g, r = list(got.token_ids), list(ref.token_ids)
    first = next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), None)
    row = {"prompt_len": prompt_len, "identical": g == r, "first_difference": first, "pallas": g, "reference": r}
    if first is not None:
        top = ref.logprobs[first].top
        prefix = [abs(a.logprob - b.logprob) for a, b in zip(got.logprobs[:first], ref.logprobs[:first])]
        row["reference_gap"] = top[0][1] - top[1][1]
        row["max_prefix_logprob_diff"] = max(prefix, default=0.0)
        row["near_tie"] = row["reference_gap"] <= 2 * row["max_prefix_logprob_diff"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", default=None)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--smoke", action="store_true", help="two short prompts, 4 tokens")
    args = ap.parse_args(argv)
    import jax
    import numpy as np
    rng = np.random.default_rng(0)
    lens = [5, 17] if args.smoke else [5, 17, 70, 150, 33, 128]
    new = 4 if args.smoke else args.new_tokens
    prompts = [rng.integers(3, 259, n).tolist() for n in lens]
    got, got_info = run("pallas", prompts, new)
    ref, ref_info = run("reference", prompts, new)
    rows = [compare(n, g, r) for n, g, r in zip(lens, got, ref)]
    result = {"machine": platform.node(), "platform": jax.default_backend(), "device": str(jax.devices()[0]),
              "jax": jax.__version__, "model": "random:tiny float32", "new_tokens": new,
              "identical": sum(r["identical"] for r in rows), "prompts": len(rows),
              "near_ties": sum(bool(r.get("near_tie")) for r in rows),
              "pallas": got_info, "reference": ref_info, "rows": rows,
              "command": "python scripts/gpu_engine_parity.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    for r in rows:
        why = "" if r["identical"] else (f" (reference top-2 gap {r['reference_gap']:.2e}, engines disagree by up to "
                                         f"{r['max_prefix_logprob_diff']:.2e} before: "
                                         f"{'near tie' if r['near_tie'] else 'NOT a near tie'})")
        print(f"prompt {r['prompt_len']:>4} tokens: "
              f"{'identical' if r['identical'] else 'differs at ' + str(r['first_difference'])}{why}")
    print(f"engine parity (pallas vs reference, greedy): {result['identical']}/{result['prompts']} prompts identical")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

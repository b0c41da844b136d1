"""Sampling step time by candidate selection (engine/truncation.py), side by side in one run.

usage: python scripts/bench_sampling.py [--batch 16] [--repeats 10] [--synthetic [--vocab 128256]] [--output FILE]
Logits are real: SmolLM2's rows over a paragraph of text. ``--synthetic`` uses Zipf-shaped
random logits instead, calibrated to SmolLM2's kept-set sizes, at vocabulary ``--vocab`` (e.g.
Llama-3's 128,256). For each setting (greedy, plain temperature, top-p, top-k, min-p) it times
``engine.sampling.sample`` jitted with ``select`` = sort (full sort, the baseline), top_k and
compaction, checks that all three return the same tokens, and prints ms per call and
the speed-up over the full sort. It also prints the kept-set sizes, which decide how often the
larger candidate tier or the full sort runs.
"""
import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXT = ("The history of the city begins in the early medieval period, when traders from the north "
        "settled along the river. Over the centuries it grew into a busy port, and today it is known "
        "for its museums, its food and its music festivals. Write a short poem about the sea, then "
        "explain in two sentences why the tides rise and fall twice a day.")


def _logits(synthetic: bool, rows: int, vocab: int):
    import numpy as np
    if synthetic:
        rng = np.random.default_rng(0)
        V = vocab
        ranks = np.arange(1, V + 1)
        # Zipf rows p ~ rank^-s, s in [1.25, 2.2]: at T=1, top_p=0.9 the kept set is ~10 tokens at the
        # median and ~300 at p90, close to SmolLM2's real rows (15 and 223).
        return np.stack([(-rng.uniform(1.25, 2.2) * np.log(ranks))[rng.permutation(V)]
                         + rng.normal(0, 0.3, V) for _ in range(rows)]).astype(np.float32)
    import jax.numpy as jnp
    from ferry.models.naive import naive_logits
    from ferry.models.registry import load_model
    b = load_model()
    ids = b.tokenizer.encode(TEXT)
    return np.asarray(naive_logits(b.config, b.params, jnp.asarray(ids)), np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--vocab", type=int, default=49152, help="vocabulary size of --synthetic logits")
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ferry.engine.sampling import SamplingBatch, SamplingRow, host_rows, sample
    from ferry.engine.sampling_params import SamplingParams

    all_logits = _logits(a.synthetic, 64, a.vocab)
    rng = np.random.default_rng(1)
    pick = rng.choice(len(all_logits), size=a.batch, replace=len(all_logits) < a.batch)
    logits = jnp.asarray(all_logits[pick])
    B, V = logits.shape
    settings = {
        "greedy": SamplingParams(temperature=0),
        "T=1": SamplingParams(temperature=1.0),
        "T=1 top_p=0.9": SamplingParams(temperature=1.0, top_p=0.9),
        "T=0.7 top_p=0.9": SamplingParams(temperature=0.7, top_p=0.9),
        "T=1 top_p=0.95": SamplingParams(temperature=1.0, top_p=0.95),
        "T=1 top_k=50": SamplingParams(temperature=1.0, top_k=50),
        "T=1 min_p=0.05": SamplingParams(temperature=1.0, min_p=0.05),
    }
    sizes = {}
    for name, p in settings.items():
        if p.temperature > 0 and p.top_p < 1:
            x = np.asarray(all_logits) / p.temperature
            q = np.exp(x - x.max(-1, keepdims=True))
            q /= q.sum(-1, keepdims=True)
            n = (np.cumsum(-np.sort(-q, -1), -1) < p.top_p).sum(-1) + 1
            sizes[name] = {"median": float(np.median(n)), "p90": float(np.percentile(n, 90)), "max": int(n.max())}
    selects = ("sort", "top_k", "compaction")
    fns = {s: jax.jit(functools.partial(sample, select=s)) for s in selects}
    print(f"device {jax.devices()[0].device_kind}, B={B}, V={V}, logits: {'synthetic' if a.synthetic else 'SmolLM2'}")
    print(f"{'setting':18s}" + "".join(f"{s:>12s}" for s in selects) + f"{'sort/top_k':>12s}{'sort/compact':>13s}")
    results = {}
    for name, p in settings.items():
        rows = [SamplingRow(p, 1000 + i, 7) for i in range(B)]
        sb = SamplingBatch(**{k: jnp.asarray(v) for k, v in host_rows(rows, B).items()})
        ms, toks = {}, {}
        for s in selects:
            toks[s] = np.asarray(jax.block_until_ready(fns[s](logits, sb))[0])
            t = time.perf_counter()
            for _ in range(a.repeats):
                jax.block_until_ready(fns[s](logits, sb))
            ms[s] = (time.perf_counter() - t) / a.repeats * 1e3
        same = all(np.array_equal(toks[s], toks["sort"]) for s in selects)
        results[name] = {"ms": ms, "same_tokens": same}
        print(f"{name:18s}" + "".join(f"{ms[s]:12.2f}" for s in selects)
              + f"{ms['sort'] / ms['top_k']:11.1f}x{ms['sort'] / ms['compaction']:12.1f}x" + ("" if same else "  TOKENS DIFFER"))
    for name, s in sizes.items():
        print(f"kept-set size, {name} over {len(all_logits)} rows: median {s['median']:.0f}, p90 {s['p90']:.0f}, max {s['max']}")
    if a.output:
        with open(a.output, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "batch": B,
                       "vocab": V, "logits": "synthetic" if a.synthetic else "smollm2", "repeats": a.repeats,
                       "results": results, "kept_set_sizes": sizes}, f, indent=1)


if __name__ == "__main__":
    main()

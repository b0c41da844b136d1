"""Decode throughput: Ferry vs HF transformers ``generate``, side by side in one run.

    python scripts/bench_decode.py                       # default model, CPU, batches 1 4 16 64
    python scripts/bench_decode.py --shape llama-3.2-1b  # random bf16 weights of that shape (GPU), batches 1 16 64
    python scripts/bench_decode.py --shape llama-3-8b --no-hf

For each batch size B, both engines generate exactly --new-tokens tokens
(EOS ignored, greedy) for B copies of a prompt. Reported: generated tokens per
second of wall time, prefill included (the same work for both), Ferry's
decode-only rate, and the ratio. With --shape, the memory roofline at every
batch size (``B * copy bandwidth / weight bytes``: the weights, less an untied
embedding table, are read once per decode step, which yields B tokens; the HBM copy bandwidth is measured in the
same run, before the engines start) and the fraction of it Ferry's decode rate
reaches (``rows[i]["roofline_tok_s"]``, ``rows[i]["roofline_fraction"]``).
On a GPU the HF model is built on the GPU and its inputs are put on the
model's device. ``--gemm-floor`` also times, at every batch size, the weight matmuls of one
decode step alone (every layer's projections and the LM head, random f32 weights of the
model's shapes, ``[out, in]`` as Ferry stores them) in one jitted XLA program and in torch, in
the same run: ``B / that time`` bounds any engine's decode rate on this machine from above.
Writes JSON to --output (after every batch size, so a timeout keeps the finished rows).
``--baseline-rev REV --rounds N``: Ferry alone (no HF), this tree and git revision REV in
turn, N rounds, each a fresh process; prints the per-batch ratio of this tree's decode rate over
REV's (medians over rounds) and writes them under ``baseline``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def bench_ferry(llm, prompt_ids, batch: int, new_tokens: int, repeats: int) -> dict:
    from ferry import SamplingParams
    p = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([prompt_ids] * batch, p)                     # warm caches / first-touch
    best = None
    for _ in range(repeats):
        t0 = time.time()
        outs = llm.generate([prompt_ids] * batch, p)
        t1 = time.time()
        assert all(len(o.token_ids) == new_tokens for o in outs)
        first = max(o.timings.first_token for o in outs)
        r = {"tok_s": batch * new_tokens / (t1 - t0),
             "decode_tok_s": batch * (new_tokens - 1) / max(t1 - first, 1e-9), "seconds": t1 - t0}
        best = r if best is None or r["tok_s"] > best["tok_s"] else best
    return best


def _sync(model) -> None:
    import torch
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def bench_hf(model, prompt_ids, batch: int, new_tokens: int, repeats: int) -> dict:
    import torch
    ids = torch.tensor([prompt_ids] * batch, device=model.device)          # inputs on the model's device
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        best = None
        for _ in range(repeats):
            _sync(model)
            t0 = time.time()
            out = model.generate(ids, **kw)
            _sync(model)
            dt = time.time() - t0
            assert out.shape[1] - ids.shape[1] == new_tokens
            best = dt if best is None else min(best, dt)
    return {"tok_s": batch * new_tokens / best, "seconds": best}


def load_hf(shape: str | None, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    if shape is None:
        from ferry.models.registry import default_model_path
        path = default_model_path()
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    dtype=torch.float32).eval()
    from ferry.models.config import SHAPES
    c = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
                      tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=4096)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):                    # initialised on the device: an 8B model's CPU init takes minutes
        return AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).eval()


def weight_bytes_per_step(params: dict) -> int:
    """Bytes of weights one decode step must read: all of them, except an untied embedding table
    (only the B looked-up rows of it are read; with tied embeddings the LM head reads it whole)."""
    import jax
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    if "lm_head" in params and "embed" in params:
        total -= params["embed"].nbytes
    return total


def add_roofline(result: dict, bw: float, weight_bytes: int) -> None:
    """Memory roofline per row: B tokens per step, weights read once per step at ``bw`` bytes/s."""
    result["copy_bandwidth_gbs"] = bw / 1e9
    result["weight_bytes"] = weight_bytes
    result["roofline_tok_s_batch1"] = bw / weight_bytes
    for r in result["rows"]:
        r["roofline_tok_s"] = r["batch"] * bw / weight_bytes
        r["roofline_fraction"] = r["ferry"]["decode_tok_s"] / r["roofline_tok_s"]
        if r["batch"] == 1:
            result["roofline_fraction_batch1"] = r["roofline_fraction"]


def step_matmul_shapes(cfg) -> list[tuple[int, int]]:
    """(out, in) of every weight matmul in one decode step of ``cfg`` (dense models)."""
    D, Dh, F = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * Dh, cfg.num_kv_heads * Dh
    return [(q, D), (kv, D), (kv, D), (D, q), (F, D), (F, D), (D, F)] * cfg.num_layers + [(cfg.vocab_size, D)]


def gemm_floor(shapes, batch: int, repeats: int = 7) -> dict:
    """Median seconds of ``x[batch, in] @ w[out, in].T`` over ``shapes`` (one step's matmuls): one
    jitted XLA program, and torch on every core. Independent matmuls: XLA may overlap them, which
    only lowers the floor."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    xs = {n: rng.standard_normal((batch, n), dtype=np.float32) for n in {s[1] for s in shapes}}

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2]

    jw, jx = [jnp.asarray(w) for w in ws], {n: jnp.asarray(x) for n, x in xs.items()}
    dims = [w.shape[1] for w in ws]
    f = jax.jit(lambda xd, wl: [jax.lax.dot_general(xd[n], w, (((1,), (1,)), ((), ()))) for n, w in zip(dims, wl)])
    xla_s = timed(lambda: jax.block_until_ready(f(jx, jw)))
    torch.set_num_threads(os.cpu_count() or 1)
    tw, tx = [torch.from_numpy(w) for w in ws], {n: torch.from_numpy(x) for n, x in xs.items()}
    with torch.inference_mode():
        torch_s = timed(lambda: [tx[n] @ w.T for n, w in zip(dims, tw)])
    return {"xla_ms": round(1000 * xla_s, 2), "torch_ms": round(1000 * torch_s, 2),
            "xla_floor_tok_s": round(batch / xla_s, 1), "torch_floor_tok_s": round(batch / torch_s, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default=None, help="random weights of this shape (e.g. llama-3.2-1b)")
    ap.add_argument("--batches", default=None, help="default 1,4,16,64 (1,16,64 with --shape)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--output", default=None)
    ap.add_argument("--dtype", default="auto", help="Ferry's dtype (auto: float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--gemm-floor", action="store_true", help="also time one decode step's matmuls alone "
                    "(XLA and torch, f32)")
    ap.add_argument("--baseline-rev", default=None, help="Ferry at this git revision and this tree, alternating")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--decode-steps", type=int, default=None, help="EngineConfig.decode_steps (default: the engine's)")
    ap.add_argument("--attn-impl", default=None, help="EngineConfig.attn_impl (default: the engine's)")
    args = ap.parse_args()
    if args.baseline_rev:
        return side_by_side(args)
    batches = [int(b) for b in (args.batches or ("1,16,64" if args.shape else "1,4,16,64")).split(",")]

    from ferry import LLM
    import jax
    bw = None
    if args.shape:                                  # before the engines hold device memory
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_kernels import copy_bandwidth     # the benchmarks' one copy measurement
        bw = copy_bandwidth(2**30 if jax.default_backend() != "cpu" else 2**26, iters=10, repeats=3)
        print(f"[bench] {jax.devices()[0]}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    model = f"random:{args.shape}" if args.shape else None
    print(f"[bench] building Ferry engine (model={model or 'default'}, max_batch={max(batches)})", flush=True)
    llm = LLM(model=model, max_batch=max(batches), max_model_len=512, max_prefill_chunk=128, dtype=args.dtype,
              **({"decode_steps": args.decode_steps} if args.decode_steps else {}),
              **({"attn_impl": args.attn_impl} if args.attn_impl else {}))
    prompt_ids = llm.tokenizer.encode(PROMPT)
    print(f"[bench] warm-up compile: {llm.engine.warmup_seconds:.1f}s; prompt {len(prompt_ids)} tokens", flush=True)
    hf = None if args.no_hf else load_hf(args.shape, "bfloat16" if args.shape else "float32")

    rows = []
    result = {"machine": platform.node(), "platform": jax.default_backend(),
              "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "model": model or "SmolLM2-135M-Instruct",
              "new_tokens": args.new_tokens, "prompt_tokens": len(prompt_ids), "rows": rows,
              "decode_steps": llm.engine.config.decode_steps, "attn_impl": llm.engine.config.attn_impl,
              "kernels": llm.engine.kernels.as_dict(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "command": "python scripts/bench_decode.py " + " ".join(sys.argv[1:])}
    if args.shape:
        result["shape"] = args.shape
        result["warmup_seconds"] = llm.engine.warmup_seconds
    for b in batches:
        print(f"[bench] batch {b} ...", flush=True)
        r = {"batch": b, "ferry": bench_ferry(llm, prompt_ids, b, args.new_tokens, args.repeats)}
        if hf is not None:
            r["hf"] = bench_hf(hf, prompt_ids, b, args.new_tokens, args.repeats)
            r["ratio"] = r["ferry"]["tok_s"] / r["hf"]["tok_s"]
        if args.gemm_floor:
            r["gemm_floor"] = gemm_floor(step_matmul_shapes(llm.engine.model_config), b)
            print(f"[bench] batch {b}: one step's matmuls alone {r['gemm_floor']}", flush=True)
        rows.append(r)
        if args.shape:
            add_roofline(result, bw, weight_bytes_per_step(llm.engine.params))
            print(f"[bench] batch {b}: ferry decode {r['ferry']['decode_tok_s']:.1f} tok/s = "
                  f"{100 * r['roofline_fraction']:.1f}% of the roofline ({r['roofline_tok_s']:.0f} tok/s)", flush=True)
        if args.output:
            _write(args.output, result)

    print(f"\n{'batch':>5} {'ferry tok/s':>12} {'ferry decode':>13} {'hf tok/s':>10} {'ratio':>7} {'xla gemm floor':>15}")
    for r in rows:
        hf_s = f"{r['hf']['tok_s']:10.1f}" if "hf" in r else f"{'-':>10}"
        ratio = f"{r['ratio']:7.2f}" if "ratio" in r else f"{'-':>7}"
        floor = f"{r['gemm_floor']['xla_floor_tok_s']:15.1f}" if "gemm_floor" in r else f"{'-':>15}"
        print(f"{r['batch']:>5} {r['ferry']['tok_s']:12.1f} {r['ferry']['decode_tok_s']:13.1f} {hf_s} {ratio} {floor}")
    if "roofline_fraction_batch1" in result:
        print(f"batch-1 roofline {result['roofline_tok_s_batch1']:.0f} tok/s; achieved "
              f"{100 * result['roofline_fraction_batch1']:.1f}%")
    for r in rows:
        if "roofline_fraction" in r:
            print(f"batch {r['batch']:>3}: roofline {r['roofline_tok_s']:.0f} tok/s, achieved "
                  f"{100 * r['roofline_fraction']:.1f}%")
    if args.output:
        _write(args.output, result)
        print(f"wrote {args.output}")
    return 0


def side_by_side(args) -> int:
    """This tree against ``args.baseline_rev``, alternating fresh processes (scripts/baseline.py)."""
    import statistics
    import subprocess
    import tempfile
    from baseline import alternate
    runs: dict = {"baseline": [], "now": []}
    flags = ["--no-hf", "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    flags += ["--batches", args.batches] if args.batches else []
    flags += ["--shape", args.shape] if args.shape else []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run.json")
        for label, path in alternate(args.baseline_rev, args.rounds):
            print(f"[bench] {label} ({path}) ...", flush=True)
            subprocess.run([sys.executable, os.path.join(path, "scripts", "bench_decode.py"), *flags, "--output", out],
                           check=True, env=dict(os.environ, PYTHONPATH=path), stdout=subprocess.DEVNULL)
            with open(out) as f:
                runs[label].append({r["batch"]: r["ferry"]["decode_tok_s"] for r in json.load(f)["rows"]})
    batches = sorted(runs["now"][0])
    med = {k: {b: statistics.median(r[b] for r in v) for b in batches} for k, v in runs.items()}
    rows = [{"batch": b, "baseline_decode_tok_s": med["baseline"][b], "now_decode_tok_s": med["now"][b],
             "now_over_baseline": med["now"][b] / med["baseline"][b]} for b in batches]
    print(f"\n{'batch':>5} {'baseline tok/s':>15} {'now tok/s':>10} {'now/baseline':>13}")
    for r in rows:
        print(f"{r['batch']:>5} {r['baseline_decode_tok_s']:15.1f} {r['now_decode_tok_s']:10.1f} "
              f"{r['now_over_baseline']:13.3f}")
    if args.output:
        import jax
        _write(args.output, {"command": "python scripts/bench_decode.py " + " ".join(sys.argv[1:]),
                             "machine": platform.node(), "platform": jax.default_backend(),
                             "cpu_count": os.cpu_count(), "model": f"random:{args.shape}" if args.shape else
                             "SmolLM2-135M-Instruct", "new_tokens": args.new_tokens,
                             "baseline": {"rev": args.baseline_rev, "rounds": args.rounds, "runs": runs, "rows": rows}})
    return 0


def _write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())

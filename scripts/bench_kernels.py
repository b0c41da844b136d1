"""Kernel benchmarks for the lent GPU: HBM copy bandwidth, paged attention, prefill attention, K/V write, NonZero compaction.

usage: python scripts/bench_kernels.py [--output benchmarks/results/kernels_<gpu>.json] [--smoke] [--iters N]
                                       [--sections attention,prefill,kv_write,compaction]

One run measures, side by side on the same inputs:
  * HBM copy bandwidth (bytes read + written by a large device copy): the ceiling;
  * decode paged attention, Llama-3-8B heads (32 q / 8 kv, Dh 128), bf16, page 16, at
    (B, L) in (1,4096) (8,2048) (64,512) (64,2048) (128,1024): Ferry's Pallas kernel (a few
    pages_per_block / num_warps / num_stages configurations; the default one and the best are
    reported), jax.experimental.pallas.ops.gpu.paged_attention (deprecated; its own layout,
    converted outside the timed region) and the XLA gather reference. GB/s = KV bytes read / time;
  * prefill attention over pages (one 512-token chunk after 1536 cached tokens): Pallas vs XLA;
  * K/V write into pages by slot mapping, Llama-3-8B cache (32 layers, 8 kv heads, Dh 128, bf16,
    page 16, 2048 pages: 2 GiB per cache) at T = 16 (decode: random slots), 512 and 4096 (prefill
    chunks: consecutive offsets in shuffled pages): Ferry's Pallas kernel (a few tokens_per_block /
    num_warps configurations) vs the XLA scatter reference, both with donated caches (in place, as in
    the engine step). Checked bit for bit against the reference first. GB/s = K+V bytes written /
    time; ``cache_copy_us`` is what one copy of both caches would cost at the copy bandwidth: a
    time near it means the in-place aliasing failed;
  * compaction at n = 2^16, 2^20, 2^24 (50% density, bool mask): Ferry vs jnp.nonzero(size=n),
    and the bandwidth floor (n bytes read + 4 * count bytes written at the measured copy bandwidth).
Every result is checked against the reference (relative L2 error; exact for compaction) before
timing; time = median of --iters runs after a warm-up, inputs rotated where they would fit in L2.
--smoke: tiny shapes on CPU, all Pallas kernels in interpret mode (proves the script runs end to
end; the numbers mean nothing).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ferry.kernels.compaction_pallas import nonzero  # noqa: E402
from ferry.kernels.paged_attention import paged_attention_reference  # noqa: E402
from ferry.kernels.paged_attention_pallas import paged_attention  # noqa: E402
from ferry.kernels.kv_write_pallas import write_kv  # noqa: E402
from ferry.kernels.prefill_attention import prefill_attention_reference, write_kv_reference  # noqa: E402
from ferry.kernels.prefill_attention_pallas import prefill_attention  # noqa: E402

KVW_CONFIGS = [dict(tokens_per_block=32, num_warps=4), dict(tokens_per_block=16, num_warps=2),
               dict(tokens_per_block=64, num_warps=4), dict(tokens_per_block=64, num_warps=8)]
PA_CONFIGS = [dict(pages_per_block=4, num_warps=4, num_stages=2), dict(pages_per_block=8, num_warps=4, num_stages=2),
              dict(pages_per_block=4, num_warps=8, num_stages=3), dict(pages_per_block=8, num_warps=8, num_stages=3)]


def timeit(fn, arg_sets, iters):
    """Median seconds per call; cycles through ``arg_sets`` (lists of args) so small inputs leave L2."""
    for args in arg_sets:
        jax.block_until_ready(fn(*args))
    ts = []
    for i in range(iters):
        args = arg_sets[i % len(arg_sets)]
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def copy_bandwidth(nbytes, iters):
    xs = [jnp.full((nbytes // 4,), float(i + 1), jnp.float32) for i in range(2)]
    f = jax.jit(lambda a: a * 1.0001)
    return 2 * xs[0].nbytes / timeit(f, [[x] for x in xs], iters)


def attn_case(B, L, Hq, Hkv, Dh, S, dtype, rng):
    P_max = L // S
    P = B * P_max + 1
    k = jnp.asarray(rng.standard_normal((1, Hkv, P, S, Dh)), dtype)
    v = jnp.asarray(rng.standard_normal((1, Hkv, P, S, Dh)), dtype)
    tables = jnp.asarray(rng.permutation(np.arange(1, P))[:B * P_max].reshape(B, P_max).astype(np.int32))
    lens = jnp.full((B,), L, jnp.int32)
    q = jnp.asarray(rng.standard_normal((B, Hq, Dh)), dtype)
    return q, k, v, tables, lens


def _jax_deprecated(q, k, v, bt, lens, scale, args, results_row, ref):
    """JAX's deprecated Triton paged attention on the same data (layout converted and q pre-scaled outside
    timing: that kernel applies no softmax scale of its own)."""
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa
        P_max = bt.shape[1]
        k_splits = min(16, P_max)
        ppcb = max(1, min(8, P_max // k_splits))
        kp, vp = jax.block_until_ready((k[0], v[0]))                       # [Hkv, P, S, Dh]: its layout
        q = jax.block_until_ready((q.astype(jnp.float32) * scale).astype(q.dtype))
        jfn = jax.jit(lambda q, kp, vp, bt, l: jax_pa.paged_attention(
            q, kp, vp, bt, l, k_splits=k_splits, pages_per_compute_block=ppcb, interpret=args.smoke))
        results_row["jax_deprecated_rel_err"] = rel_err(jfn(q, kp, vp, bt, lens), ref)
        return timeit(jfn, [[q, kp, vp, bt, lens]], args.iters)
    except Exception as e:                                                  # not importable / failed to lower
        results_row["jax_deprecated_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        return None


def bench_attention(cases, args, rng, results, copy_bw):
    Hq, Hkv, Dh, S = (32, 8, 128, 16) if not args.smoke else (8, 2, 32, 16)
    dtype = jnp.bfloat16
    configs = PA_CONFIGS if not args.smoke else PA_CONFIGS[:2]
    for B, L in cases:
        q, k, v, bt, lens = attn_case(B, L, Hq, Hkv, Dh, S, dtype, rng)
        kv_bytes = 2 * B * L * Hkv * Dh * jnp.dtype(dtype).itemsize
        scale = Dh ** -0.5
        ref = paged_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                        0, bt, lens, scale=scale)
        ref_fn = jax.jit(lambda q, k, v, bt, l: paged_attention_reference(q, k, v, 0, bt, l, scale=scale))
        row = {"B": B, "L": L, "kv_bytes": kv_bytes, "xla_ref_rel_err": rel_err(ref_fn(q, k, v, bt, lens), ref),
               "ferry_configs": []}
        inputs = [[q, k, v, bt, lens]]
        for cfg in configs:
            fn = jax.jit(lambda q, k, v, bt, l, cfg=cfg: paged_attention(q, k, v, 0, bt, l, scale=scale,
                                                                         interpret=args.smoke, **cfg))
            entry = dict(cfg)
            try:
                entry["rel_err"] = rel_err(fn(q, k, v, bt, lens), ref)
                entry["ok"] = entry["rel_err"] < 1e-2
                entry["us"] = 1e6 * timeit(fn, inputs, args.iters) if entry["ok"] else None
            except Exception as e:                                           # lowering failure: report, go on
                entry.update(ok=False, us=None, error=f"{type(e).__name__}: {str(e)[:300]}")
            row["ferry_configs"].append(entry)
        good = [c for c in row["ferry_configs"] if c["ok"]]
        row["ferry_default_us"] = row["ferry_configs"][0]["us"]
        row["ferry_us"] = min(c["us"] for c in good) if good else None
        row["ferry_best_config"] = min(good, key=lambda c: c["us"]) if good else None
        row["xla_ref_us"] = 1e6 * timeit(ref_fn, inputs, args.iters)
        t = _jax_deprecated(q, k, v, bt, lens, scale, args, row, ref)
        row["jax_deprecated_us"] = 1e6 * t if t else None
        for name in ("ferry", "ferry_default", "xla_ref", "jax_deprecated"):
            us = row.get(f"{name}_us")
            row[f"{name}_GBps"] = kv_bytes / (us * 1e-6) / 1e9 if us else None
        row["ferry_frac_of_copy_bw"] = row["ferry_GBps"] * 1e9 / copy_bw if row["ferry_GBps"] else None
        row["ferry_over_jax_deprecated"] = (row["jax_deprecated_us"] / row["ferry_us"]
                                            if row["ferry_us"] and row["jax_deprecated_us"] else None)
        results["paged_attention"].append(row)
        print(f"attn B={B:4d} L={L:5d}  ferry {_f(row['ferry_GBps'])} GB/s  xla {_f(row['xla_ref_GBps'])} GB/s  "
              f"jax-deprecated {_f(row['jax_deprecated_GBps'])} GB/s", flush=True)


def bench_prefill(args, rng, results):
    Hq, Hkv, Dh, S, T, ctx = (32, 8, 128, 16, 512, 2048) if not args.smoke else (8, 2, 32, 16, 32, 64)
    dtype = jnp.bfloat16
    P_max = ctx // S
    k = jnp.asarray(rng.standard_normal((1, Hkv, P_max + 1, S, Dh)), dtype)
    v = jnp.asarray(rng.standard_normal((1, Hkv, P_max + 1, S, Dh)), dtype)
    table = jnp.asarray(rng.permutation(np.arange(1, P_max + 1)).astype(np.int32))
    positions = jnp.arange(ctx - T, ctx, dtype=jnp.int32)                  # the last chunk of a prompt
    q = jnp.asarray(rng.standard_normal((T, Hq, Dh)), dtype)
    scale = Dh ** -0.5
    ref = prefill_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), 0,
                                      table, positions, scale=scale)
    ours = jax.jit(lambda q, k, v: prefill_attention(q, k, v, 0, table, positions, scale=scale, interpret=args.smoke))
    xla = jax.jit(lambda q, k, v: prefill_attention_reference(q, k, v, 0, table, positions, scale=scale))
    flops = 4 * T * Hq * Dh * (ctx - T / 2)                                  # causal: QK^T and PV
    row = {"T": T, "context": ctx}
    try:
        row["ferry_rel_err"] = rel_err(ours(q, k, v), ref)
        row["ferry_us"] = 1e6 * timeit(ours, [[q, k, v]], args.iters) if row["ferry_rel_err"] < 1e-2 else None
    except Exception as e:
        row.update(ferry_us=None, ferry_error=f"{type(e).__name__}: {str(e)[:300]}")
    row["xla_ref_us"] = 1e6 * timeit(xla, [[q, k, v]], args.iters)
    for name in ("ferry", "xla_ref"):
        row[f"{name}_TFLOPs"] = flops / (row[f"{name}_us"] * 1e-6) / 1e12 if row[f"{name}_us"] else None
    results["prefill_attention"].append(row)
    print(f"prefill T={T} ctx={ctx}: ferry {_f(row['ferry_us'])} us  xla {_f(row['xla_ref_us'])} us", flush=True)


def _kvw_slots(T, P, S, layout, rng):
    """Decode ("random"): T distinct slots anywhere. Prefill chunk ("chunk"): consecutive offsets in shuffled pages."""
    if layout == "random":
        return jnp.asarray(rng.permutation(P * S)[:T].astype(np.int32))
    pages = rng.permutation(np.arange(1, P))[:-(-T // S)]
    t = np.arange(T)
    return jnp.asarray((pages[t // S] * S + t % S).astype(np.int32))


def timeit_donated(fn, caches, rest, iters):
    """Median seconds per call of ``caches = fn(*caches, *rest)`` with the caches donated (updated in place)."""
    for _ in range(2):
        caches = jax.block_until_ready(fn(*caches, *rest))
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        caches = jax.block_until_ready(fn(*caches, *rest))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), caches


def bench_kv_write(args, rng, results, copy_bw):
    L, Hkv, Dh, S, P = (32, 8, 128, 16, 2048) if not args.smoke else (2, 2, 32, 16, 16)
    cases = [(16, "random"), (512, "chunk"), (4096, "chunk")] if not args.smoke else [(16, "random"), (40, "chunk")]
    dtype, layer = jnp.bfloat16, L // 2
    configs = KVW_CONFIGS if not args.smoke else KVW_CONFIGS[:2]
    shape = (L, Hkv, P, S, Dh)
    kk, kv, kn = jax.random.split(jax.random.PRNGKey(0), 3)
    caches = jax.block_until_ready((jax.random.normal(kk, shape, dtype), jax.random.normal(kv, shape, dtype)))
    cache_bytes = 2 * caches[0].nbytes
    for T, layout in cases:
        k, v = jax.random.normal(jax.random.fold_in(kn, T), (2, T, Hkv, Dh), dtype)
        slots = _kvw_slots(T, P, S, layout, rng)
        written = 2 * T * Hkv * Dh * jnp.dtype(dtype).itemsize
        row = {"T": T, "slots": layout, "layers": L, "kv_heads": Hkv, "head_dim": Dh, "page_size": S, "pages": P,
               "bytes_written": written, "cache_bytes": cache_bytes,
               "cache_copy_us": 2 * cache_bytes / copy_bw * 1e6, "ferry_configs": []}
        # Check every config on the same untouched caches first (not donated: outputs are copies), then time
        # with donation: timed runs rewrite the same values, so the caches stay equal to ``ref``.
        ref = jax.jit(lambda kc, vc, k, v, s: write_kv_reference(kc, vc, layer, k, v, s))(*caches, k, v, slots)
        for cfg in configs:
            entry = dict(cfg, us=None)
            try:
                got = jax.jit(lambda kc, vc, k, v, s, cfg=cfg: write_kv(kc, vc, layer, k, v, s, interpret=args.smoke,
                                                                        **cfg))(*caches, k, v, slots)
                entry["ok"] = bool(jnp.array_equal(got[0], ref[0])) and bool(jnp.array_equal(got[1], ref[1]))
                del got
            except Exception as e:                                    # lowering failure: report, go on
                entry.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            row["ferry_configs"].append(entry)
        del ref
        for entry in row["ferry_configs"]:
            if entry["ok"]:
                cfg = {n: entry[n] for n in ("tokens_per_block", "num_warps")}
                donated = jax.jit(lambda kc, vc, k, v, s, cfg=cfg: write_kv(
                    kc, vc, layer, k, v, s, interpret=args.smoke, **cfg), donate_argnums=(0, 1))
                t, caches = timeit_donated(donated, caches, (k, v, slots), args.iters)
                entry["us"] = 1e6 * t
        xla = jax.jit(lambda kc, vc, k, v, s: write_kv_reference(kc, vc, layer, k, v, s), donate_argnums=(0, 1))
        t, caches = timeit_donated(xla, caches, (k, v, slots), args.iters)
        row["xla_ref_us"] = 1e6 * t
        good = [c for c in row["ferry_configs"] if c["ok"]]
        row["ferry_default_us"] = row["ferry_configs"][0]["us"]
        row["ferry_us"] = min(c["us"] for c in good) if good else None
        row["ferry_best_config"] = min(good, key=lambda c: c["us"]) if good else None
        for name in ("ferry", "ferry_default", "xla_ref"):
            us = row[f"{name}_us"]
            row[f"{name}_GBps"] = written / (us * 1e-6) / 1e9 if us else None
        # bytes moved = K/V read + cache written = 2 * written; the copy bandwidth counts read + write too
        row["ferry_frac_of_copy_bw"] = 2 * row["ferry_GBps"] * 1e9 / copy_bw if row["ferry_GBps"] else None
        row["ferry_speedup_vs_xla"] = row["xla_ref_us"] / row["ferry_us"] if row["ferry_us"] else None
        results["kv_write"].append(row)
        print(f"kv write T={T:5d} ({layout}): ferry {_f(row['ferry_us'])} us {_f(row['ferry_GBps'])} GB/s  "
              f"xla {_f(row['xla_ref_us'])} us {_f(row['xla_ref_GBps'])} GB/s  "
              f"(copy of both caches: {row['cache_copy_us']:.0f} us)", flush=True)


def bench_compaction(sizes, args, rng, results, copy_bw, density=0.5):
    for n in sizes:
        xs = [jnp.asarray(rng.random(n) < density) for _ in range(4 if n <= 1 << 22 else 1)]
        ours = jax.jit(lambda x: nonzero(x, size=n, interpret=args.smoke))
        ref = jax.jit(lambda x: jnp.nonzero(x, size=n, fill_value=-1)[0])
        got, count = ours(xs[0])
        ok = bool(np.array_equal(np.asarray(got), np.asarray(ref(xs[0])))) and int(count) == int(jnp.sum(xs[0]))
        t_ours = timeit(ours, [[x] for x in xs], args.iters) if ok else None
        t_ref = timeit(ref, [[x] for x in xs], args.iters)
        floor = (n + 4 * n * density) / copy_bw                              # read mask once, write indices once
        row = {"n": n, "density": density, "ok": ok, "ferry_us": t_ours and t_ours * 1e6, "jnp_nonzero_us": t_ref * 1e6,
               "speedup": t_ref / t_ours if t_ours else None, "floor_us": floor * 1e6,
               "ferry_over_floor": t_ours / floor if t_ours else None}
        results["compaction"].append(row)
        print(f"nonzero n=2^{int(np.log2(n))}: ferry {_f(row['ferry_us'])} us  jnp {row['jnp_nonzero_us']:.1f} us  "
              f"floor {row['floor_us']:.1f} us  ok={ok}", flush=True)


def _f(x, w=9, p=1):
    return f"{x:{w}.{p}f}" if x is not None else f"{'n/a':>{w}}"


def print_table(res):
    bw = res["copy_GBps"]
    print(f"\n== {res['device']} ({res['backend']}, jax {res['jax']}), copy bandwidth {bw:.0f} GB/s ==")
    print("paged attention (GB/s of KV read)     ferry  ferry-default       xla  jax-depr  ferry/copy  ferry/jax-depr")
    for r in res["paged_attention"]:
        frac = r["ferry_frac_of_copy_bw"]
        print(f"  B={r['B']:4d} L={r['L']:5d}             {_f(r['ferry_GBps'])}     {_f(r['ferry_default_GBps'])}  "
              f"{_f(r['xla_ref_GBps'])} {_f(r['jax_deprecated_GBps'])}  {_f(frac and 100 * frac, 9)}%  "
              f"{_f(r['ferry_over_jax_deprecated'], 9, 2)}x")
    for r in res["prefill_attention"]:
        print(f"prefill T={r['T']} ctx={r['context']}: ferry {_f(r['ferry_TFLOPs'], 6, 1)} TFLOP/s  "
              f"xla {_f(r['xla_ref_TFLOPs'], 6, 1)} TFLOP/s")
    print("K/V write (GB/s written)          ferry  ferry-default       xla  ferry/xla  ferry/copy   ferry us")
    for r in res["kv_write"]:
        frac = r["ferry_frac_of_copy_bw"]
        print(f"  T={r['T']:5d} {r['slots']:6s}           {_f(r['ferry_GBps'])}     {_f(r['ferry_default_GBps'])}  "
              f"{_f(r['xla_ref_GBps'])} {_f(r['ferry_speedup_vs_xla'], 9, 2)}x {_f(frac and 100 * frac, 9)}%  "
              f"{_f(r['ferry_us'])}")
    print("compaction (us)            ferry   jnp.nonzero   speedup   floor   ferry/floor")
    for r in res["compaction"]:
        print(f"  n=2^{int(np.log2(r['n'])):2d}           {_f(r['ferry_us'])}     {_f(r['jnp_nonzero_us'])}  "
              f"{_f(r['speedup'], 7, 1)}x {_f(r['floor_us'], 7)}  {_f(r['ferry_over_floor'], 8, 2)}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=None, help="write all numbers as JSON here")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU, Pallas interpret mode")
    ap.add_argument("--sections", default="attention,prefill,kv_write,compaction",
                    help="comma-separated subset of attention,prefill,kv_write,compaction (copy bandwidth always runs)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    unknown = sections - {"attention", "prefill", "kv_write", "compaction"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")
    if args.smoke:
        jax.config.update("jax_platforms", "cpu")
    rng = np.random.default_rng(0)
    dev = jax.devices()[0]
    results = {"device": getattr(dev, "device_kind", str(dev)), "backend": jax.default_backend(),
               "jax": jax.__version__, "smoke": args.smoke, "paged_attention": [], "prefill_attention": [],
               "kv_write": [], "compaction": []}
    if args.smoke:
        args.iters = 2
        attn_cases, nz_sizes, copy_bytes = [(1, 64), (4, 32)], [1 << 10, 1 << 12], 1 << 22
    else:
        attn_cases = [(1, 4096), (8, 2048), (64, 512), (64, 2048), (128, 1024)]
        nz_sizes, copy_bytes = [1 << 16, 1 << 20, 1 << 24], 1 << 30
    bw = copy_bandwidth(copy_bytes, args.iters)
    results["copy_GBps"] = bw / 1e9
    print(f"device {results['device']}: copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    if "attention" in sections:
        bench_attention(attn_cases, args, rng, results, bw)
    if "prefill" in sections:
        bench_prefill(args, rng, results)
    if "kv_write" in sections:
        bench_kv_write(args, rng, results, bw)
    if "compaction" in sections:
        bench_compaction(nz_sizes, args, rng, results, bw)
    print_table(results)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

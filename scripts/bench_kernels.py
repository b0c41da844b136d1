"""Kernel benchmarks for the lent GPU: HBM copy bandwidth, paged attention, NonZero compaction.

usage: python scripts/bench_kernels.py [--output benchmarks/results/kernels_<gpu>.json] [--smoke]

One run measures, side by side on the same inputs:
  * HBM copy bandwidth (bytes read + written by a large device copy): the ceiling;
  * decode paged attention, Llama-3-8B heads (32 q / 8 kv, Dh 128), bf16, page 16, at
    (B, L) in (1,4096) (8,2048) (64,512) (64,2048) (128,1024): Ferry's Pallas kernel,
    jax.experimental.pallas.ops.gpu.paged_attention (deprecated; its own layout, converted
    outside the timed region) and the XLA gather reference; GB/s = KV bytes read / time;
  * compaction at n = 2^16, 2^20, 2^24 (50% density): Ferry vs jnp.nonzero(size=n), and the
    bandwidth floor (n bytes read + 4 * count bytes written at the measured copy bandwidth).
Each result is checked against the reference before timing; time = median of --iters runs.
--smoke: tiny shapes, CPU, Pallas interpret mode (proves the script runs; numbers meaningless).
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

from kernels.compaction import nonzero_reference  # noqa: E402
from kernels.compaction_pallas import nonzero  # noqa: E402
from kernels.paged_attention import paged_attention_reference  # noqa: E402
from kernels.paged_attention_pallas import paged_attention  # noqa: E402


def timeit(fn, *args, iters=20):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def copy_bandwidth(nbytes, iters):
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 0)
    return 2 * x.nbytes / timeit(f, x, iters=iters)


def attn_case(B, L, Hq, Hkv, Dh, S, dtype, rng):
    P_max = L // S
    P = B * P_max + 1
    k = jnp.asarray(rng.standard_normal((1, Hkv, P, S, Dh)), dtype)
    v = jnp.asarray(rng.standard_normal((1, Hkv, P, S, Dh)), dtype)
    tables = jnp.asarray(rng.permutation(np.arange(1, P))[:B * P_max].reshape(B, P_max).astype(np.int32))
    lens = jnp.full((B,), L, jnp.int32)
    q = jnp.asarray(rng.standard_normal((B, Hq, Dh)), dtype)
    return q, k, v, tables, lens


def bench_attention(cases, args, rng, results):
    Hq, Hkv, Dh, S = (32, 8, 128, 16) if not args.smoke else (8, 2, 32, 16)
    dtype = jnp.bfloat16
    for B, L in cases:
        q, k, v, bt, lens = attn_case(B, L, Hq, Hkv, Dh, S, dtype, rng)
        kv_bytes = 2 * B * L * Hkv * Dh * jnp.dtype(dtype).itemsize
        scale = Dh ** -0.5
        ref_fn = jax.jit(lambda q, k, v, bt, l: paged_attention_reference(q, k, v, 0, bt, l, scale=scale))
        ours_fn = jax.jit(lambda q, k, v, bt, l: paged_attention(q, k, v, 0, bt, l, scale=scale,
                                                                 interpret=args.smoke))
        ref = ref_fn(q, k, v, bt, lens)
        got = ours_fn(q, k, v, bt, lens)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32))))
        row = {"B": B, "L": L, "max_abs_err": err,
               "ferry_us": 1e6 * timeit(ours_fn, q, k, v, bt, lens, iters=args.iters),
               "xla_ref_us": 1e6 * timeit(ref_fn, q, k, v, bt, lens, iters=args.iters)}
        try:
            from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa
            kp = jnp.transpose(k[0], (0, 1, 2, 3)).reshape(Hkv, -1, S, Dh)        # [Hkv, P, S, Dh]
            vp = v[0].reshape(Hkv, -1, S, Dh)
            jfn = jax.jit(lambda q, kp, vp, bt, l: jax_pa.paged_attention(q, kp, vp, bt, l, pages_per_compute_block=8))
            jax.block_until_ready(jfn(q, kp, vp, bt, lens))
            row["jax_deprecated_us"] = 1e6 * timeit(jfn, q, kp, vp, bt, lens, iters=args.iters)
        except Exception as e:                       # not importable / not on GPU
            row["jax_deprecated_us"] = None
            row["jax_deprecated_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        for name in ("ferry", "xla_ref", "jax_deprecated"):
            t = row.get(f"{name}_us")
            row[f"{name}_GBps"] = kv_bytes / (t * 1e-6) / 1e9 if t else None
        results["paged_attention"].append(row)
        print(f"attn B={B:4d} L={L:5d}  ferry {row['ferry_GBps']:9.1f} GB/s  xla {row['xla_ref_GBps']:9.1f} GB/s  "
              f"jax-deprecated {row['jax_deprecated_GBps'] or float('nan'):9.1f} GB/s  err {err:.2e}", flush=True)


def bench_compaction(sizes, args, rng, results, copy_bw):
    for n in sizes:
        x = jnp.asarray(rng.random(n) < 0.5)
        ours = jax.jit(lambda x: nonzero(x, size=n, interpret=args.smoke))
        ref = jax.jit(lambda x: jnp.nonzero(x, size=n, fill_value=-1)[0])
        assert np.array_equal(np.asarray(ours(x)[0]), np.asarray(nonzero_reference(x, size=n)[0]))
        t_ours = timeit(ours, x, iters=args.iters)
        t_ref = timeit(ref, x, iters=args.iters)
        floor = (2 * n + 4 * n * 0.5) / copy_bw * 2          # two reads of n bytes + index writes
        row = {"n": n, "ferry_us": t_ours * 1e6, "jnp_nonzero_us": t_ref * 1e6, "speedup": t_ref / t_ours,
               "floor_us": floor * 1e6, "ferry_over_floor": t_ours / floor}
        results["compaction"].append(row)
        print(f"nonzero n=2^{int(np.log2(n))}: ferry {row['ferry_us']:9.1f} us  jnp {row['jnp_nonzero_us']:9.1f} us  "
              f"x{row['speedup']:.1f}  floor {row['floor_us']:.1f} us", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=None)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    dev = jax.devices()[0]
    results = {"device": getattr(dev, "device_kind", str(dev)), "backend": jax.default_backend(),
               "jax": jax.__version__, "smoke": args.smoke, "paged_attention": [], "compaction": []}
    if args.smoke:
        args.iters = 2
        attn_cases, nz_sizes, copy_bytes = [(1, 64), (4, 32)], [1 << 10, 1 << 12], 1 << 22
    else:
        attn_cases = [(1, 4096), (8, 2048), (64, 512), (64, 2048), (128, 1024)]
        nz_sizes, copy_bytes = [1 << 16, 1 << 20, 1 << 24], 1 << 30
    bw = copy_bandwidth(copy_bytes, args.iters)
    results["copy_GBps"] = bw / 1e9
    print(f"device {results['device']}: copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    bench_attention(attn_cases, args, rng, results)
    bench_compaction(nz_sizes, args, rng, results, bw)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

"""GGUF dequantization time: Ferry's models/gguf_quants.py vs ``gguf.quants.dequantize``, per tensor type.

usage: python scripts/bench_gguf_dequant.py [--model FILE.gguf] [--repeats 11] [--output FILE.json]

Reads every tensor of the file (default: the default model, ``default_model_path()``),
dequantizes each one with both implementations, checks they are bit-identical, and
reports the seconds per ggml type and overall (whole file, i.e. one model load's worth of
dequantization), min and median over ``repeats``; per tensor the two run back to back. Both
run on the same bytes, copied into RAM first: reading the file is not timed (it is paid once
either way). On a shared machine the min is the least disturbed figure.
"""
import argparse
import collections
import importlib.metadata
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import gguf
    import numpy as np

    from ferry.models import gguf_quants as fq
    from ferry.models.registry import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    path = args.model or default_model_path()
    reader = gguf.GGUFReader(path, "r")
    tensors = []
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        raw = np.array(np.asarray(t.data).view(np.uint8).reshape(-1))   # in RAM: no page-cache effects
        tensors.append((t.name, int(t.tensor_type), shape, raw))

    def ferry_one(tt, shape, raw):
        return fq.dequantize(raw, tt, shape)

    def gguf_one(tt, shape, raw):
        qtype = gguf.GGMLQuantizationType(tt)
        _, nbytes = fq.BLOCK[tt] if tt in fq.BLOCK else gguf.GGML_QUANT_SIZES[qtype]
        rows = raw.reshape(shape[0] if len(shape) > 1 else 1, -1)
        return gguf.quants.dequantize(rows, qtype).reshape(shape).astype(np.float32, copy=False)

    # correctness first (bit for bit), so a fast but wrong implementation cannot win
    for name, tt, shape, raw in tensors:
        np.testing.assert_array_equal(ferry_one(tt, shape, raw), gguf_one(tt, shape, raw), err_msg=name)

    impls = {"ferry": ferry_one, "gguf": gguf_one}
    load_before = os.getloadavg()
    # Per tensor, both implementations back to back (order alternating between repeats), so the
    # shared machine's load changes hit both alike; per repeat, seconds per ggml type and in total.
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in impls}
    for rep in range(args.repeats):
        order = list(impls) if rep % 2 == 0 else list(impls)[::-1]
        per = {k: collections.defaultdict(float) for k in impls}
        for _, tt, shape, raw in tensors:
            for impl in order:
                t0 = time.perf_counter()
                impls[impl](tt, shape, raw)
                per[impl][fq.NAMES.get(tt, str(tt))] += time.perf_counter() - t0
        for impl in impls:
            per[impl]["total"] = sum(per[impl].values())
            runs[impl].append(dict(per[impl]))
    keys = list(runs["ferry"][0])
    best = {impl: {k: min(r[k] for r in rs) for k in keys} for impl, rs in runs.items()}
    median = {impl: {k: float(np.median([r[k] for r in rs])) for k in keys} for impl, rs in runs.items()}
    counts = collections.Counter(fq.NAMES.get(tt, str(tt)) for _, tt, _, _ in tensors)
    result = {
        "model": os.path.basename(path),
        "tensors_by_type": dict(counts),
        "bytes": int(sum(r.size for *_, r in tensors)),
        "repeats": args.repeats,
        "seconds_min_over_repeats": {k: {t: round(v, 4) for t, v in d.items()} for k, d in best.items()},
        "seconds_median_over_repeats": {k: {t: round(v, 4) for t, v in d.items()} for k, d in median.items()},
        "speedup_ferry_over_gguf_min": {t: round(best["gguf"][t] / best["ferry"][t], 2) for t in keys},
        "speedup_ferry_over_gguf_median": {t: round(median["gguf"][t] / median["ferry"][t], 2) for t in keys},
        "bit_identical": True,
        "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                   f"numpy {np.__version__}, gguf {importlib.metadata.version('gguf')}",
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
    }
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

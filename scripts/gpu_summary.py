"""One table of the GPU checks: each issue-13 target beside what was measured (reads the JSON files in a folder).

usage: python scripts/gpu_summary.py OUT_DIR [--json FILE]

Reads what ``scripts/gpu_checks.sh`` writes: ``selection_*.json`` (kernel self-check),
``engine_parity_*.json`` (scripts/gpu_engine_parity.py),
``kernels_*.json`` (scripts/bench_kernels.py; the sections of several files are merged),
``sampling_*.json`` and ``decode_<shape>_*.json``. A missing file or row shows as MISSING, never
as a crash: the table is printed after a run that timed out too. Status: PASS / FAIL against the
target, "info" for a measurement without a target. Exit status 0 whatever the verdicts.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys


@dataclasses.dataclass(frozen=True)
class Line:
    """One row of the table: ``measured`` is None when nothing was measured."""

    what: str
    target: str
    measured: float | None
    unit: str
    ok: bool | None            # None: no target (info) or not measured

    @property
    def status(self) -> str:
        if self.measured is None:
            return "MISSING"
        return "info" if self.ok is None else ("PASS" if self.ok else "FAIL")


def _load(folder: str, pattern: str) -> list[dict]:
    docs = []
    for path in sorted(glob.glob(os.path.join(folder, pattern))):
        try:
            with open(path) as f:
                docs.append(json.load(f))
        except (OSError, ValueError):
            continue
    return docs


def _kernels(folder: str) -> dict:
    merged = {"paged_attention": [], "prefill_attention": [], "kv_write": [], "compaction": [], "copy_GBps": None}
    for d in _load(folder, "kernels_*.json"):
        for k in ("paged_attention", "prefill_attention", "kv_write", "compaction"):
            merged[k] += d.get(k, [])
        merged["copy_GBps"] = merged["copy_GBps"] or d.get("copy_GBps")
        merged["device"] = d.get("device")
    return merged


def _row(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), {})


def _at_least(what, target, x, goal, unit):
    return Line(what, target, x, unit, None if x is None else x >= goal)


def _at_most(what, target, x, goal, unit):
    return Line(what, target, x, unit, None if x is None else x <= goal)


def lines(folder: str) -> list[Line]:
    out = []
    for d in _load(folder, "selection_*.json"):
        for c in d.get("choices", []):
            shape = c.get("shape", {})
            failed = [o["name"] for o in c.get("ops", []) if o.get("reason", "").startswith("self-check failed")]
            fallbacks = [n for n in failed if not n.endswith("mosaic_gpu")]      # the Mosaic variant is opt-in
            label = f"self-check, {shape.get('q_heads')}q/{shape.get('kv_heads')}kv Dh {shape.get('head_dim')} {shape.get('dtype')}"
            out.append(Line(f"{label}: fallbacks " + (",".join(fallbacks) or "none"),
                            "0 fallbacks", float(len(fallbacks)), "ops", not fallbacks))
            for o in c.get("ops", []):
                if o["name"].endswith("mosaic_gpu"):
                    out.append(Line(f"{label}: {o['name']} -> {o['impl']} ({o.get('reason', '')[:60]})", "",
                                    1.0 if o["impl"] == "pallas" else 0.0, "kept", None))
    if not any(x.what.startswith("self-check") for x in out):
        out.append(Line("kernel self-check", "0 fallbacks", None, "ops", None))
    par = _load(folder, "engine_parity_*.json")
    p = par[0] if par else {}
    out.append(Line(f"engine greedy tokens, Pallas vs reference ({p.get('model', 'random:tiny')})",
                    "all prompts", p.get("identical"), f"of {p.get('prompts', '?')}",
                    None if not p else p.get("identical") == p.get("prompts")))
    if p and p.get("identical") != p.get("prompts") and "near_ties" in p:
        out.append(Line("  the differing prompts: near ties (rounding flips the top token)",
                        "all of them", p["near_ties"], f"of {p['prompts'] - p['identical']}",
                        p["near_ties"] == p["prompts"] - p["identical"]))
    k = _kernels(folder)
    pa = k["paged_attention"]
    r = _row(pa, B=64, L=2048)
    frac = r.get("ferry_frac_of_copy_bw")
    out.append(_at_least("paged attn B=64 L=2048, fraction of copy BW", ">= 80%",
                         None if frac is None else 100 * frac, 80, "%"))
    r = _row(pa, B=8, L=2048)
    out.append(_at_least("paged attn B=8 L=2048, speed-up over JAX deprecated", ">= 2x",
                         r.get("ferry_over_jax_deprecated"), 2, "x"))
    r = _row(pa, B=1, L=4096)
    out.append(_at_most("paged attn B=1 L=4096, time over bandwidth floor", "<= 2x", r.get("ferry_over_floor"), 2, "x"))
    out.append(_at_most("paged attn B=1 L=4096, same net of loop overhead", "<= 2x", r.get("ferry_net_over_floor"),
                        2, "x"))
    for r in pa:
        out.append(Line(f"paged attn B={r['B']} L={r['L']}: Mosaic GPU / Triton speed-up", "> 1: make default",
                        r.get("mosaic_gpu_over_triton"), "x", None))
        for name in ("ferry", "ferry_mosaic_gpu", "xla_ref", "jax_deprecated", "cudnn"):
            err = r.get(f"{name}_error")
            why = f" ({err[:60]})" if err and not r.get(f"{name}_GBps") else ""
            out.append(Line(f"paged attn B={r['B']} L={r['L']}: {name}{why}", "", r.get(f"{name}_GBps"), "GB/s", None))
    r = _row(k["compaction"], n=1 << 24)
    out.append(_at_least("compaction n=2^24, speed-up over jnp.nonzero", ">= 10x", r.get("speedup"), 10, "x"))
    out.append(_at_most("compaction n=2^24, time over bandwidth floor", "<= 2x", r.get("ferry_over_floor"), 2, "x"))
    out.append(_at_most("compaction n=2^24, same net of loop overhead", "<= 2x", r.get("ferry_net_over_floor"), 2, "x"))
    for r in k["kv_write"]:
        out.append(Line(f"K/V write T={r['T']}: ferry / XLA scatter speed-up", "", r.get("ferry_speedup_vs_xla"), "x", None))
    for r in k["prefill_attention"]:
        out.append(Line(f"prefill T={r['T']} ctx={r['context']}: ferry", "", r.get("ferry_TFLOPs"), "TFLOP/s", None))
    out.append(Line("HBM copy bandwidth (kernel bench)", "", k["copy_GBps"], "GB/s", None))
    for d in _load(folder, "sampling_*.json"):
        for name, res in d.get("results", {}).items():
            ms = res.get("ms", {})
            out.append(Line(f"sampling B={d.get('batch')} V={d.get('vocab')} {name}: compaction (sort {ms.get('sort', 0):.2f} ms)",
                            "same tokens", ms.get("compaction"), "ms", bool(res.get("same_tokens"))))
    dec = {d.get("shape"): d for d in _load(folder, "decode_llama*.json")}
    r1 = _row(dec.get("llama-3.2-1b", {}).get("rows", []), batch=1)
    frac = r1.get("roofline_fraction")
    out.append(_at_least("decode Llama-3.2-1B bf16 batch 1, fraction of roofline", ">= 85%",
                         None if frac is None else 100 * frac, 85, "%"))
    for shape in ("llama-3.2-1b", "llama-3-8b"):
        for b in (1, 16, 64):
            r = _row(dec.get(shape, {}).get("rows", []), batch=b)
            tok = r.get("ferry", {}).get("decode_tok_s")
            frac = r.get("roofline_fraction")
            hf = r.get("hf", {}).get("tok_s")
            extra = f" ({100 * frac:.1f}% of roofline" + (f", HF {hf:.0f} tok/s)" if hf else ")") if frac is not None else ""
            out.append(Line(f"decode {shape} batch {b}: ferry tok/s{extra}", "", tok, "tok/s", None))
    for d in _load(folder, "decode_variant_*.json"):
        for r in d.get("rows", []):
            frac = r.get("roofline_fraction")
            out.append(Line(f"decode variant {d.get('shape')} K={d.get('decode_steps')} attn={d.get('attn_impl')}"
                            f"{' ' + d['xla_flags'].strip() if d.get('xla_flags', '').strip() else ''} batch {r['batch']}"
                            + ("" if frac is None else f" ({100 * frac:.1f}% of roofline)"),
                            "", r.get("ferry", {}).get("decode_tok_s"), "tok/s", None))
    for d in _load(folder, "cost_model_*.json"):
        for field in ("base", "decode_base", "per_prefill_token", "per_decode_row", "per_context_token"):
            v = d.get(field)
            out.append(Line(f"cost model {d.get('model')}: {field}", "", None if v is None else 1e3 * v, "ms", None))
    return out


def render(ls: list[Line]) -> str:
    w = max(len(x.what) for x in ls)
    rows = [f"{'measurement':<{w}}  {'target':>12}  {'measured':>12}  status", "-" * (w + 38)]
    for x in ls:
        m = "-" if x.measured is None else f"{x.measured:.2f} {x.unit}"
        rows.append(f"{x.what:<{w}}  {x.target:>12}  {m:>12}  {x.status}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--json", default=None, help="also write the lines as JSON here")
    a = ap.parse_args(argv)
    ls = lines(a.folder)
    print(render(ls))
    steps = os.path.join(a.folder, "steps.txt")
    if os.path.exists(steps):
        print("\nsteps (name rc seconds; rc 124 = timed out):")
        print(open(steps).read().rstrip())
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dict(dataclasses.asdict(x), status=x.status) for x in ls], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

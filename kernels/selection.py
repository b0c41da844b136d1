"""Safe start: which implementation (Pallas kernel or XLA reference) each kernel op uses, chosen once per engine.

``choose_kernels(attn_impl, backend=None, self_check=True) -> KernelChoice``

* ``attn_impl="reference"``: every op takes its XLA reference.
* ``attn_impl="auto"``: an op takes its Pallas kernel where it has a lowering for ``backend``
  (``OpSpec.backends``: decode attention on GPU and TPU, the others on GPU only), else the reference.
* ``attn_impl="pallas"``: every op takes its Pallas kernel (on CPU: interpret mode, the tests).

On GPU/TPU with ``self_check`` (the default), every op that would run its Pallas kernel is
compiled and run once on small random inputs (``CheckShape``: the engine's head layout and
dtype) and compared with its reference on the same inputs. A kernel that fails to trace, lower,
compile or run, returns non-finite values, or disagrees beyond ``OpSpec.tol`` is replaced by its
reference for that engine, with one WARNING line on logger ``"ferry"`` naming the op and the
reason. Nothing here raises for a kernel failure: the engine always starts. On CPU the check is
skipped unless asked for explicitly with ``backend`` (tests pass ``backend="gpu"`` on a CPU host:
the kernels then run in Pallas interpret mode, which is how the failure path is tested).

Adding an op (e.g. ragged paged attention) is one ``OpSpec`` entry in ``OPS``: a name, the
backends its kernel lowers for, the Pallas and reference callables (each takes the dict made by
``make_inputs`` and returns an array or a tuple of arrays) and a tolerance. The engine passes
``choice.impl(name)`` ("pallas" or "reference") as the ``impl=`` of that op's dispatcher.

``python -m ferry.kernels.selection [--backend gpu] [--no-self-check] [--with-mosaic-gpu] [--output FILE]``
prints the choice (the self-check entry of ``scripts/gpu_checks.sh``). The Mosaic GPU decode
variant (``PAGED_ATTENTION_MOSAIC_GPU``) is opt-in: not in ``OPS``, added with ``ops=``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ferry.kernels import compaction, paged_attention, prefill_attention

log = logging.getLogger("ferry")

IMPLS = ("pallas", "reference")


@dataclasses.dataclass(frozen=True)
class CheckShape:
    """The shapes and dtype of the self-check inputs; pass the engine's model layout so that the
    kernels are compiled for the head counts, head dim, page size and dtype they will serve."""

    q_heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    page_size: int = 16
    dtype: Any = jnp.bfloat16
    soft_cap: float | None = None


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One kernel op: how to run its Pallas kernel and its reference on the same small inputs.

    ``pallas(inputs) / reference(inputs)``: ``inputs`` is the dict ``make_inputs(rng, shape)``
    returns; each returns an array or a tuple of arrays of the same shapes. ``tol``: allowed
    relative L2 error of the kernel against the reference (0.0 = bit for bit).
    ``backends``: where ``attn_impl="auto"`` picks the kernel (where it has a lowering)."""

    name: str
    backends: tuple[str, ...]
    pallas: Callable[[dict], Any]
    reference: Callable[[dict], Any]
    make_inputs: Callable[[np.random.Generator, CheckShape], dict]
    tol: float


@dataclasses.dataclass(frozen=True)
class OpChoice:
    """What one op runs and why. ``check_s``: seconds the self-check took (None: not checked)."""

    name: str
    impl: str                       # "pallas" | "reference"
    reason: str
    check_s: float | None = None


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """The per-op implementation choice of one engine (``ops`` in ``OPS`` order)."""

    backend: str
    attn_impl: str
    ops: tuple[OpChoice, ...]

    def _get(self, name: str) -> OpChoice:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(f"no kernel op {name!r}; known: {[o.name for o in self.ops]}")

    def impl(self, name: str) -> str:
        """"pallas" or "reference": the ``impl=`` to pass to op ``name``'s dispatcher."""
        return self._get(name).impl

    def reason(self, name: str) -> str:
        return self._get(name).reason

    @property
    def fallbacks(self) -> tuple[str, ...]:
        """Ops whose Pallas kernel was wanted but failed its self-check."""
        return tuple(o.name for o in self.ops if o.reason.startswith("self-check failed"))

    def summary(self) -> str:
        """One line for the start-up log, e.g. ``kernels (gpu, attn_impl=auto): paged_attention=pallas
        (self-check ok, 1.2 s), ...``."""
        parts = []
        for o in self.ops:
            why = o.reason if len(o.reason) <= 80 else o.reason[:77] + "..."
            parts.append(f"{o.name}={o.impl} ({why})")
        return f"kernels ({self.backend}, attn_impl={self.attn_impl}): " + "; ".join(parts)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "attn_impl": self.attn_impl,
                "ops": [dataclasses.asdict(o) for o in self.ops]}


# ----------------------------------------------------------------------------- small inputs per op
def _cache(rng, shape: CheckShape, layers: int, pages: int):
    dims = (layers, shape.kv_heads, pages, shape.page_size, shape.head_dim)
    k = jnp.asarray(rng.standard_normal(dims, np.float32), shape.dtype)
    v = jnp.asarray(rng.standard_normal(dims, np.float32), shape.dtype)
    return k, v


def _decode_inputs(rng, shape: CheckShape) -> dict:
    """B=4 rows (one padding row, one full table), 5 pages per table, shuffled pages, layer 1 of 2."""
    B, P_max, S = 4, 5, shape.page_size
    P = B * P_max + 1
    k, v = _cache(rng, shape, 2, P)
    lens = rng.integers(1, P_max * S + 1, size=B).astype(np.int32)
    lens[0], lens[-1] = P_max * S, 0
    tables = rng.permutation(np.arange(1, P))[:B * P_max].reshape(B, P_max).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((B, shape.q_heads, shape.head_dim), np.float32), shape.dtype)
    return dict(q=q, k_cache=k, v_cache=v, layer=jnp.int32(1), block_tables=jnp.asarray(tables),
                seq_lens=jnp.asarray(lens), scale=shape.head_dim ** -0.5, soft_cap=shape.soft_cap)


def _prefill_inputs(rng, shape: CheckShape) -> dict:
    """A 13-token chunk at positions 20..32 of one request over 4 shuffled pages (+ 3 padding tokens)."""
    S, P_max = shape.page_size, 4
    P = 2 * P_max + 1
    k, v = _cache(rng, shape, 2, P)
    T, start = 16, min(20, P_max * S - 13)
    positions = np.full((T,), -1, np.int32)
    positions[:13] = np.arange(start, start + 13)
    q = jnp.asarray(rng.standard_normal((T, shape.q_heads, shape.head_dim), np.float32), shape.dtype)
    table = rng.permutation(np.arange(1, P))[:P_max].astype(np.int32)
    return dict(q=q, k_cache=k, v_cache=v, layer=jnp.int32(1), block_table=jnp.asarray(table),
                positions=jnp.asarray(positions), scale=shape.head_dim ** -0.5, soft_cap=shape.soft_cap)


def _kv_write_inputs(rng, shape: CheckShape) -> dict:
    """11 tokens into distinct random slots of a 6-page cache, two of them padding (slot -1)."""
    P, S, T = 6, shape.page_size, 11
    k_cache, v_cache = _cache(rng, shape, 2, P)
    slots = rng.permutation(P * S)[:T].astype(np.int32)
    slots[[3, 7]] = -1
    kv = rng.standard_normal((2, T, shape.kv_heads, shape.head_dim), np.float32)
    return dict(k_cache=k_cache, v_cache=v_cache, layer=jnp.int32(1), k=jnp.asarray(kv[0], shape.dtype),
                v=jnp.asarray(kv[1], shape.dtype), slot_mapping=jnp.asarray(slots))


def _compaction_inputs(rng, shape: CheckShape) -> dict:
    """A 2-D mask [4, 700] (the sampler's layout), 30% dense, size below the count."""
    del shape
    x = jnp.asarray(rng.random((4, 700)) < 0.3)
    return dict(x=x, size=600)


# ----------------------------------------------------------------------------- the ops
def _attn_kw(i: dict) -> dict:
    return dict(scale=i["scale"], soft_cap=i["soft_cap"])


def _decode(impl):
    return lambda i: paged_attention.paged_attention(
        i["q"], i["k_cache"], i["v_cache"], i["layer"], i["block_tables"], i["seq_lens"], impl=impl, **_attn_kw(i))


def _prefill(impl):
    return lambda i: prefill_attention.prefill_attention(
        i["q"], i["k_cache"], i["v_cache"], i["layer"], i["block_table"], i["positions"], impl=impl, **_attn_kw(i))


def _kv_write(impl):
    return lambda i: prefill_attention.write_kv(
        i["k_cache"], i["v_cache"], i["layer"], i["k"], i["v"], i["slot_mapping"], impl=impl)


def _compaction(impl):
    return lambda i: compaction.nonzero(i["x"], size=i["size"], impl=impl)


# The table: one entry per op. The Pallas callables go through the ops' own dispatchers with
# impl="pallas", so the self-check runs exactly what the engine will run (and a test that
# monkeypatches a kernel module's function is seen here).
OPS: tuple[OpSpec, ...] = (
    OpSpec("paged_attention", ("gpu", "tpu"), _decode("pallas"), _decode("reference"), _decode_inputs, 2e-2),
    OpSpec("prefill_attention", ("gpu",), _prefill("pallas"), _prefill("reference"), _prefill_inputs, 2e-2),
    OpSpec("kv_write", ("gpu",), _kv_write("pallas"), _kv_write("reference"), _kv_write_inputs, 0.0),
    OpSpec("compaction", ("gpu",), _compaction("pallas"), _compaction("reference"), _compaction_inputs, 0.0),
)



def _decode_mosaic_gpu(i):
    """The Mosaic GPU decode variant (selectable, not in ``OPS``: see its module docstring)."""
    from ferry.kernels import paged_attention_mosaic_gpu
    from ferry.kernels.common import interpret
    return paged_attention_mosaic_gpu.paged_attention(
        i["q"], i["k_cache"], i["v_cache"], i["layer"], i["block_tables"], i["seq_lens"], interpret=interpret(),
        **_attn_kw(i))


# Opt-in: ``choose_kernels(..., ops=OPS + (PAGED_ATTENTION_MOSAIC_GPU,))`` self-checks it too (bf16/f16,
# head dim a multiple of 64, page size dividing 64). No dispatcher routes to it yet.
PAGED_ATTENTION_MOSAIC_GPU = OpSpec("paged_attention_mosaic_gpu", ("gpu",), _decode_mosaic_gpu,
                                    _decode("reference"), _decode_inputs, 2e-2)

_STATIC = ("scale", "soft_cap", "size")          # python values, not traced


def _jitted(fn: Callable[[dict], Any], inputs: dict):
    static = {k: v for k, v in inputs.items() if k in _STATIC}
    arrays = {k: v for k, v in inputs.items() if k not in _STATIC}
    return jax.block_until_ready(jax.jit(lambda a: fn({**a, **static}))(arrays))


def _rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return math.inf
    if not np.isfinite(got).all():
        return math.inf
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def run_self_check(spec: OpSpec, shape: CheckShape, seed: int = 0) -> str | None:
    """Compile and run ``spec``'s kernel and reference on fresh small inputs; None if they agree,
    else the reason (exception, non-finite output, mismatch). Never raises for a kernel failure."""
    rng = np.random.default_rng(seed)
    try:
        inputs = spec.make_inputs(rng, shape)
        got = _jitted(spec.pallas, inputs)
    except Exception as e:                               # trace / lower / compile / run failure
        msg = " ".join(str(e).split())
        return f"{type(e).__name__}: {msg[:300]}"
    ref = _jitted(spec.reference, inputs)
    got_l, ref_l = jax.tree.leaves(got), jax.tree.leaves(ref)
    if len(got_l) != len(ref_l):
        return f"returned {len(got_l)} arrays, the reference {len(ref_l)}"
    for j, (g, r) in enumerate(zip(got_l, ref_l)):
        if g.shape != r.shape:
            return f"output {j}: shape {g.shape}, reference {r.shape}"
        if spec.tol == 0.0:
            if not np.array_equal(np.asarray(g), np.asarray(r), equal_nan=True):
                bad = int(np.sum(np.asarray(g) != np.asarray(r)))
                return f"output {j}: {bad} of {g.size} elements differ from the reference (exact match required)"
        else:
            err = _rel_err(g, r)
            if not err <= spec.tol:
                return f"output {j}: relative error {err:.3g} > {spec.tol:g} vs the reference"
    return None


def choose_kernels(attn_impl: str, backend: str | None = None, self_check: bool = True, *,
                   shape: CheckShape = CheckShape(), ops: tuple[OpSpec, ...] = OPS, seed: int = 0) -> KernelChoice:
    """Resolve every op of ``ops`` to "pallas" or "reference" once (see module docstring).

    ``attn_impl``: "auto" | "pallas" | "reference" (else ValueError). ``backend``: "cpu" | "gpu" |
    "tpu"; default ``jax.default_backend()``. ``self_check``: on GPU/TPU (or any explicitly given
    ``backend`` other than "cpu"), compile and compare each chosen Pallas kernel with its reference
    on small ``shape`` inputs and fall back to the reference, with a WARNING on logger "ferry",
    when it fails. ``ops``: the op table (default ``OPS``); ``seed``: of the self-check inputs.
    Never raises because a kernel fails."""
    if attn_impl not in ("auto", "pallas", "reference"):
        raise ValueError(f"unknown attn_impl {attn_impl!r}: expected 'auto', 'pallas' or 'reference'")
    backend = backend or jax.default_backend()
    check = self_check and backend != "cpu"
    chosen = []
    for i, spec in enumerate(ops):
        if attn_impl == "reference":
            chosen.append(OpChoice(spec.name, "reference", "attn_impl=reference"))
            continue
        if attn_impl == "auto" and backend not in spec.backends:
            chosen.append(OpChoice(spec.name, "reference", f"no Pallas lowering used on {backend}"))
            continue
        why = "attn_impl=pallas" if attn_impl == "pallas" else f"Pallas lowering for {backend}"
        if not check:
            chosen.append(OpChoice(spec.name, "pallas", f"{why}, not self-checked"))
            continue
        t0 = time.perf_counter()
        failure = run_self_check(spec, shape, seed=seed + i)
        dt = time.perf_counter() - t0
        if failure is None:
            chosen.append(OpChoice(spec.name, "pallas", f"self-check ok ({dt:.1f} s)", dt))
        else:
            log.warning("kernel %s: Pallas kernel failed its self-check on %s and is replaced by the XLA "
                        "reference: %s", spec.name, backend, failure)
            chosen.append(OpChoice(spec.name, "reference", f"self-check failed: {failure}", dt))
    return KernelChoice(backend=backend, attn_impl=attn_impl, ops=tuple(chosen))


def main(argv=None) -> int:
    import argparse
    import json
    ap = argparse.ArgumentParser(description="Resolve and self-check Ferry's kernels on this backend.")
    ap.add_argument("--attn-impl", default="auto", choices=("auto", "pallas", "reference"))
    ap.add_argument("--backend", default=None, help="default: jax.default_backend()")
    ap.add_argument("--no-self-check", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--with-mosaic-gpu", action="store_true", help="also self-check the opt-in Mosaic GPU decode variant")
    ap.add_argument("--output", default=None, help="write the choice as JSON here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shapes = [CheckShape(dtype=jnp.dtype(a.dtype)),
              CheckShape(q_heads=32, kv_heads=8, head_dim=128, dtype=jnp.dtype(a.dtype))]   # + Llama-3-8B heads
    out = {"jax": jax.__version__, "device": str(jax.devices()[0]), "choices": []}
    for shape in shapes:
        t0 = time.perf_counter()
        ops = OPS + ((PAGED_ATTENTION_MOSAIC_GPU,) if a.with_mosaic_gpu else ())
        choice = choose_kernels(a.attn_impl, a.backend, not a.no_self_check, shape=shape, ops=ops)
        print(f"[{shape.q_heads}q/{shape.kv_heads}kv heads, Dh {shape.head_dim}, {jnp.dtype(shape.dtype).name}] "
              f"{choice.summary()}  ({time.perf_counter() - t0:.1f} s)", flush=True)
        for o in choice.ops:
            print(f"  {o.name:18s} {o.impl:9s} {o.reason}")
        out["choices"].append({"shape": {**dataclasses.asdict(shape), "dtype": jnp.dtype(shape.dtype).name},
                               **choice.as_dict()})
        if a.output:
            with open(a.output, "w") as f:
                json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cross-platform lowering of every Pallas kernel (and of the engine's steps) for GPU and TPU, on a CPU host.

No GPU or TPU has been available to this project, so the kernels were only ever run in interpret
mode. Interpret mode does not run the Triton lowering: unsupported primitives, tiles whose size is
not a power of two, bad indexing or dtypes only fail there. ``jit(f).trace(...).lower(
lowering_platforms=("cuda",))`` runs it on a CPU host: with jaxlib 0.10.2 each ``pallas_call``
becomes a ``__gpu$xla.gpu.triton`` custom call carrying the Triton IR (TTIR, MLIR bytecode), which
is parsed back (and so verified) here. The tests assert on that IR, not just on "no exception":
the number of kernel launches per program, their grids and Triton knobs, the input/output aliasing,
the shapes and precision of the ``tt.dot`` tiles (every dimension >= 16, the minimum Triton's own
``tl.dot`` enforces), the K/V gather tiles, the soft cap, masks and 64-bit addressing.

What this does not cover: Triton's own compilation (TTIR -> TTGIR -> PTX: layouts, shared-memory
budget, register pressure) and XLA's GPU compilation need a CUDA build of jaxlib and run only on a
GPU; the numbers (correctness on hardware, speed) need the device. For TPU the Mosaic module is
built (``lowering_platforms=("tpu",)`` under an abstract mesh naming a TPU chip, since the lowering
queries the chip generation); Mosaic's layout passes run in libtpu at compile time, not here.
Lowering only: no compile, every input abstract (``jax.ShapeDtypeStruct``), no memory allocated.
Version note: Pallas's Triton registration carries the IR uncompiled only for jaxlib <= 0.10.2
(a TODO there); a later jaxlib that compiles the kernel while lowering needs a GPU for these tests.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re

import jax
import jax.numpy as jnp
import pytest

from ferry.kernels.common import pow2
from ferry.kernels.compaction_pallas import nonzero
from ferry.kernels.paged_attention_pallas import default_pages_per_block, default_splits, paged_attention
from ferry.kernels.prefill_attention_pallas import prefill_attention

try:                                          # private: parsing the Triton IR back needs its dialect
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect
except ImportError as e:                                                   # pragma: no cover
    pytest.skip(f"Triton dialect bindings unavailable: {e}", allow_module_level=True)
if "lowering_platforms" not in inspect.signature(jax.stages.Traced.lower).parameters:   # pragma: no cover
    pytest.skip("jax.stages.Traced.lower has no lowering_platforms", allow_module_level=True)

SDS = jax.ShapeDtypeStruct
I32 = jnp.int32
TRITON = "__gpu$xla.gpu.triton"


def _lower(fn, *args, platform="cuda"):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))


# ----------------------------------------------------------------------------- reading the lowered module
@dataclasses.dataclass
class Kernel:
    """One Triton launch site: backend config of the custom call and its Triton IR."""

    name: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    aliases: list[tuple[int, int]]           # (output index, operand index)
    operand_types: list[str]
    result_types: list[str]
    ttir: str


_TTIR_CACHE: dict[bytes, str] = {}


def _ttir(bytecode: bytes) -> str:
    if bytecode not in _TTIR_CACHE:
        ctx = jax_mlir.make_ir_context()
        tt_dialect.register_dialect(ctx)
        with ctx:
            _TTIR_CACHE[bytecode] = str(ir.Module.parse(bytecode))          # parse = verify
    return _TTIR_CACHE[bytecode]


def _int(attr) -> int:
    return ir.IntegerAttr(attr).value


def _kernel(op) -> Kernel:
    cfg = ir.DictAttr(op.attributes["mhlo.backend_config"])
    aliases = []
    for a in ir.ArrayAttr(op.attributes["output_operand_aliases"]):
        m = re.search(r"output_tuple_indices = \[(\d*)\], operand_index = (\d+)", str(a))
        aliases.append((int(m.group(1) or 0), int(m.group(2))))
    return Kernel(
        name=ir.StringAttr(cfg["name"]).value,
        grid=(_int(cfg["grid_x"]), _int(cfg["grid_y"]), _int(cfg["grid_z"])),
        num_warps=_int(cfg["num_warps"]), num_stages=_int(cfg["num_stages"]), aliases=aliases,
        operand_types=[str(v.type) for v in op.operands], result_types=[str(r.type) for r in op.results],
        ttir=_ttir(ir.StringAttr(cfg["ir"]).value_bytes))


def launches(lowered, target=TRITON) -> list:
    """Custom calls reachable from ``main`` in program order, every ``func.call`` expanded: a jitted
    kernel called once per layer is emitted once as a private function but launched L times."""
    module = lowered.compiler_ir("stablehlo")
    funcs = {ir.StringAttr(op.attributes["sym_name"]).value: op for op in module.body.operations
             if op.operation.name == "func.func"}

    def visit(op):
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    name = o.operation.name
                    if name == "stablehlo.custom_call":
                        if ir.StringAttr(o.attributes["call_target_name"]).value == target:
                            yield o
                    elif name == "func.call":
                        yield from visit(funcs[ir.FlatSymbolRefAttr(o.attributes["callee"]).value].operation)
                    yield from visit(o.operation)

    ops = list(visit(funcs["main"].operation))
    return [_kernel(o) for o in ops] if target == TRITON else ops


_TENSOR = r"tensor<([\dx]+)x([\w!<>.]+?)>"


def _shape(s):
    return tuple(int(d) for d in s.split("x"))


def dots(ttir):
    """[(lhs shape, rhs shape, out shape, operand dtype, tf32?)] of every ``tt.dot``."""
    out = []
    for line in ttir.splitlines():
        if "tt.dot " not in line:
            continue
        m = re.search(rf": {_TENSOR} \* {_TENSOR} -> {_TENSOR}", line)
        out.append((_shape(m.group(1)), _shape(m.group(3)), _shape(m.group(5)), m.group(2),
                    "inputPrecision = tf32" in line))
    return out


def loads(ttir):
    """[(shape, element type)] of every tensor ``tt.load``."""
    return [(_shape(m.group(1)), m.group(2))
            for m in re.finditer(r"tt\.load [^\n]*: tensor<([\dx]+)x!tt\.ptr<(\w+)>>", ttir)]


def loop_loads(ttir):
    """Sorted loads inside the kernel's ``scf.for`` (the page walk; the kernels have one loop)."""
    body = ttir.split("scf.for", 1)[1].split("scf.yield", 1)[0]
    return sorted(loads(body))


def stores(ttir):
    """[(shape, number of operands: 2 = unmasked, 3 = masked)] of every ``tt.store``."""
    return [(_shape(m.group(2)) if m.group(2) else (), len(m.group(1).split(",")))
            for m in re.finditer(r"tt\.store ([^:\n]+) : (?:tensor<([\dx]+)x)?!tt\.ptr", ttir)]


def offsets_of(ttir, shape, elem):
    """Offset types ({"i32"}, {"i64"}) of the ``tt.addptr`` ops that address ``shape`` tiles of ``elem``."""
    s = "x".join(map(str, shape))
    return set(re.findall(rf"tt\.addptr [^\n]*: tensor<{s}x!tt\.ptr<{elem}>>, tensor<{s}x(i\d+)>", ttir))


def _soft_capped(ttir):
    return "__nv_tanhf" in ttir


def _check_dots(ks, M, N, Dp, dtype_ir, f32):
    """Decode / prefill attention: scores [M, Dp] x [Dp, N] and p @ V [M, N] x [N, Dp], f32 accumulators,
    every dimension at least the tensor-core minimum of 16, exact (IEEE) f32 dots for f32 inputs."""
    (a1, b1, o1, t1, tf1), (a2, b2, o2, t2, tf2) = ks
    assert (a1, b1, o1) == ((M, Dp), (Dp, N), (M, N))
    assert (a2, b2, o2) == ((M, N), (N, Dp), (M, Dp))
    assert t1 == t2 == dtype_ir
    assert min(M, N, Dp) >= 16
    if f32:
        assert not tf1 and not tf2                                         # f32 caches: exact dots


# ----------------------------------------------------------------------------- decode paged attention
def _pa_args(B, Hq, Hkv, Dh, S, P_max, dtype, L=2, P=None):
    P = P or B * P_max + 1
    return (SDS((B, Hq, Dh), dtype), SDS((L, Hkv, P, S, Dh), dtype), SDS((L, Hkv, P, S, Dh), dtype),
            SDS((B, P_max), I32), SDS((B,), I32), SDS((), I32))


def _lower_pa(args, **kw):
    return _lower(lambda q, k, v, bt, sl, layer: paged_attention(q, k, v, layer, bt, sl, scale=0.1, **kw), *args)


DT = {"bf16": (jnp.bfloat16, "bf16"), "f32": (jnp.float32, "f32")}


@pytest.mark.parametrize("dt", ["bf16", "f32"])
@pytest.mark.parametrize("S", [16, 32, 128])
@pytest.mark.parametrize("Dh", [64, 128])
@pytest.mark.parametrize("G", [1, 3, 4, 8])
def test_paged_attention_lowers_to_triton(G, Dh, S, dt):
    """One launch per call, grid (B, Hkv, splits), both dots on >= 16-wide tiles, K/V gathered as
    [T, Dh] tiles of the cache dtype, soft cap only when asked, unmasked partial stores (padded rows
    duplicate row G-1), for split-K off and on and soft cap off and on."""
    dtype, ir_t = DT[dt]
    B, Hkv, P_max = 3, 2, 24
    args = _pa_args(B, G * Hkv, Hkv, Dh, S, P_max, dtype)
    ppb = default_pages_per_block(S, P_max)
    T, n_blocks = ppb * S, -(-P_max // ppb)
    for splits in (1, None):
        for cap in (None, 30.0):
            [k] = launches(_lower_pa(args, num_splits=splits, soft_cap=cap))
            n = 1 if splits == 1 else default_splits(B, Hkv, n_blocks)
            assert splits == 1 or n > 1                                    # split-K really on
            assert k.name == "ferry_paged_attention" and k.grid == (B, Hkv, n), k
            assert (k.num_warps, k.num_stages) == (4, 2) and k.aliases == []
            assert k.result_types[2] == f"tensor<{B}x{Hkv}x{n}x{G}x{Dh}xf32>"
            _check_dots(dots(k.ttir), max(16, pow2(G)), T, Dh, ir_t, dt == "f32")
            assert loop_loads(k.ttir) == [((T,), "i32"), ((T, Dh), ir_t), ((T, Dh), ir_t)]  # table, K, V
            assert _soft_capped(k.ttir) == (cap is not None)
            assert [n_ops for _, n_ops in stores(k.ttir)] == [2, 2, 2]         # m, l, acc: no mask
            assert offsets_of(k.ttir, (T, Dh), ir_t) == {"i32"}                 # small cache: 32-bit


BENCH_CASES = [(1, 4096), (8, 2048), (64, 512), (64, 2048), (128, 1024)]       # scripts/bench_kernels.py


def _bench_pa_configs():
    from scripts.bench_kernels import PA_CONFIGS
    return PA_CONFIGS


@pytest.mark.parametrize("cfg", _bench_pa_configs(), ids=lambda c: "ppb{pages_per_block}-w{num_warps}-s{num_stages}".format(**c))
def test_paged_attention_bench_configs_lower(cfg):
    """Every knob configuration the GPU benchmark times, at its Llama-3-8B shapes (32 q / 8 kv heads,
    Dh 128, bf16, page 16): the knobs reach the launch, the tile is pages_per_block * 16 tokens."""
    for B, L in BENCH_CASES:
        P_max = L // 16
        [k] = launches(_lower_pa(_pa_args(B, 32, 8, 128, 16, P_max, jnp.bfloat16, L=1), **cfg))
        n_blocks = -(-P_max // cfg["pages_per_block"])
        assert k.grid == (B, 8, min(default_splits(B, 8, n_blocks), n_blocks)), (B, L, k.grid)
        assert (k.num_warps, k.num_stages) == (cfg["num_warps"], cfg["num_stages"])
        _check_dots(dots(k.ttir), 16, cfg["pages_per_block"] * 16, 128, "bf16", False)


@pytest.mark.parametrize("Dh", [80, 96])
def test_non_power_of_two_head_dim_lowers(Dh):
    """Regression: Triton tiles must have power-of-two sizes, and a [T, 80] K/V gather failed to
    lower ("...whose size is a power of 2. Encountered an array of shape (16, 80)"). q is now padded
    with zeros to Dp = pow2(Dh) lanes outside the kernel, K/V lanes >= Dh are clamped loads (their
    products with q's zero lanes vanish), and the padded output lanes are sliced off."""
    Dp = pow2(Dh)
    [k] = launches(_lower_pa(_pa_args(3, 12, 4, Dh, 16, 8, jnp.bfloat16)))
    assert k.operand_types[3] == f"tensor<3x12x{Dp}xbf16>"                  # q, zero-padded
    _check_dots(dots(k.ttir), 16, 64, Dp, "bf16", False)
    assert loop_loads(k.ttir) == [((64,), "i32"), ((64, Dp), "bf16"), ((64, Dp), "bf16")]
    [k] = launches(_lower_prefill(_prefill_args(40, 12, 4, Dh, 16, 8, jnp.bfloat16)))
    assert k.result_types == [f"tensor<4x128x{Dp}xbf16>"]                  # R = 120 rows -> 2 blocks of 64
    _check_dots(dots(k.ttir), 64, 64, Dp, "bf16", False)


def test_caches_past_4_gib_use_64_bit_offsets():
    """Llama-3-8B-sized caches (32 layers, 8 KV heads, 8192 pages of 16, Dh 128, bf16: 8 GiB each)
    overflow 32-bit element offsets; the K/V gathers must address them in 64 bits (decode, prefill)."""
    big = SDS((32, 8, 8192, 16, 128), jnp.bfloat16)
    args = list(_pa_args(4, 32, 8, 128, 16, 128, jnp.bfloat16))
    args[1] = args[2] = big
    [k] = launches(_lower_pa(tuple(args)))
    assert offsets_of(k.ttir, (64, 128), "bf16") == {"i64"}               # K/V gathers
    assert offsets_of(k.ttir, (16, 128), "bf16") == {"i32"}               # q: small array
    args = list(_prefill_args(4, 32, 8, 128, 16, 128, jnp.bfloat16))     # 16 q rows per KV head
    args[1] = args[2] = big
    [k] = launches(_lower_prefill(tuple(args)))
    assert offsets_of(k.ttir, (64, 128), "bf16") == {"i64"}
    assert offsets_of(k.ttir, (16, 128), "bf16") == {"i32"}


# ----------------------------------------------------------------------------- prefill attention
def _prefill_args(T, Hq, Hkv, Dh, S, P_max, dtype, L=2, P=None):
    P = P or P_max + 3
    return (SDS((T, Hq, Dh), dtype), SDS((L, Hkv, P, S, Dh), dtype), SDS((L, Hkv, P, S, Dh), dtype),
            SDS((P_max,), I32), SDS((T,), I32), SDS((), I32))


def _lower_prefill(args, **kw):
    return _lower(lambda q, k, v, bt, pos, layer: prefill_attention(q, k, v, layer, bt, pos, scale=0.1, **kw), *args)


@pytest.mark.parametrize("dt", ["bf16", "f32"])
@pytest.mark.parametrize("S", [16, 32, 128])
@pytest.mark.parametrize("Dh", [64, 128])
@pytest.mark.parametrize("G", [1, 3, 4, 8])
def test_prefill_attention_lowers_to_triton(G, Dh, S, dt):
    """Grid (Hkv, row blocks), [block_rows, Dh] q tiles against [pages_per_block * S, Dh] K/V gathers,
    one unmasked [block_rows, Dh] output store, for one token, a 100-token chunk (R = 100 G rows, not
    a multiple of the block) and a 64-token chunk, default and explicit block_rows, soft cap on/off."""
    dtype, ir_t = DT[dt]
    Hkv, P_max = 2, 12
    TK = default_pages_per_block(S, P_max) * S
    for T, br, cap in ((1, None, None), (100, 16, 30.0), (64, 128, None), (100, None, 30.0)):
        [k] = launches(_lower_prefill(_prefill_args(T, G * Hkv, Hkv, Dh, S, P_max, dtype), block_rows=br, soft_cap=cap))
        BR = br or min(64, max(16, pow2(T * G)))
        n_rb = -(-T * G // BR)
        assert k.name == "ferry_prefill_attention" and k.grid == (Hkv, n_rb, 1), (T, br, k.grid)
        assert (k.num_warps, k.num_stages) == (4, 2) and k.aliases == []
        _check_dots(dots(k.ttir), BR, TK, Dh, ir_t, dt == "f32")
        assert loop_loads(k.ttir) == [((TK,), "i32"), ((TK, Dh), ir_t), ((TK, Dh), ir_t)]
        assert _soft_capped(k.ttir) == (cap is not None)
        assert stores(k.ttir) == [((BR, Dh), 2)]


# ----------------------------------------------------------------------------- compaction
@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.int8, jnp.int32, jnp.float32, jnp.bfloat16],
                         ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", [(1,), (1000,), (5000,), (3, 5), (4, 33, 7)], ids=str)
def test_nonzero_lowers_to_triton(shape, dtype):
    """Count then scatter, grid = blocks of the flattened input (last one partial: n is not a multiple
    of the block), the scatter's output aliased to its pre-filled operand, the in-block rank a
    ``tt.scan``, the block count a ``tt.reduce``, an unmasked scatter store (overflow lanes go to
    trash slots), for size 0, size < n and size > n."""
    n = 1
    for d in shape:
        n *= d
    block = min(1024, max(8, pow2(n)))
    nb = -(-n // block)
    x = SDS(shape, dtype)
    for size in (0, max(1, n // 3), 2 * n + 5):
        count, scatter = launches(_lower(lambda x: nonzero(x, size=size), x))
        assert (count.name, scatter.name) == ("ferry_nonzero_count", "ferry_nonzero_scatter")
        assert count.grid == scatter.grid == (nb, 1, 1)
        assert count.aliases == [] and scatter.aliases == [(0, 2)]
        assert scatter.result_types == [f"tensor<{size + block}xi32>"]
        assert '"tt.reduce"' in count.ttir and '"tt.scan"' in scatter.ttir
        elem = {"bool": "i8", "int8": "i8", "int32": "i32", "float32": "f32", "bfloat16": "bf16"}[jnp.dtype(dtype).name]
        assert loads(count.ttir) == [((block,), elem)]                     # bool is read as bytes
        assert stores(scatter.ttir) == [((block,), 2)]


# ----------------------------------------------------------------------------- engine steps
@pytest.fixture
def gpu_runner(monkeypatch):
    """A ModelRunner for random:tiny-gqa3 (2 layers, 9 q / 3 kv heads, Dh 16) with attn_impl="pallas",
    bf16, built on abstract parameters. The dispatchers pick interpret mode when
    ``jax.default_backend() == "cpu"``; it is patched to "gpu" so that tracing takes the GPU path."""
    from ferry.engine.config import EngineConfig
    from ferry.engine.model_runner import ModelRunner
    from ferry.models.config import SHAPES
    from ferry.models.llama import runtime_params
    from ferry.models.random_weights import random_params
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    cfg = SHAPES["tiny-gqa3"]
    ecfg = EngineConfig(model="random:tiny-gqa3", attn_impl="pallas", max_batch=4, max_model_len=64)
    params = jax.tree.map(lambda a: SDS(a.shape, jnp.bfloat16), runtime_params(random_params(cfg, 0)))
    runner = ModelRunner(cfg, params, ecfg, kv=None, dtype=jnp.bfloat16, guard=None)
    cache = SDS((cfg.num_layers, cfg.num_kv_heads, 12, ecfg.page_size, cfg.head_dim), jnp.bfloat16)
    return runner, cfg, params, cache


def _step_inputs(runner, T, C):
    from ferry.engine.step_inputs import StepShape, pack
    x, _ = pack(StepShape(T, C, runner.ecfg.max_batch), [], runner.page_size)
    return jax.tree.map(lambda a: SDS(a.shape, a.dtype), x)


def _state_sds(S, P, V):
    from ferry.engine.slots import empty_state
    return jax.eval_shape(lambda: empty_state(S, P, V))


def test_engine_step_lowers_with_pallas_kernels(gpu_runner):
    """The engine's ragged step (caches donated) for CUDA: per layer one K/V write (both caches
    aliased in place), the decode kernel for one-token rows and the prefill kernel for query
    blocks, and nothing else (sampling is the ``sample`` program's); the donated caches are
    aliased to the program's outputs, so no cache copy is needed anywhere in the step."""
    runner, cfg, params, cache = gpu_runner
    st = _state_sds(runner.ecfg.max_batch, runner.ecfg.max_pages_per_seq, cfg.vocab_size)
    lowered = runner.programs["step"].fn.trace(params, cache, cache, st, _step_inputs(runner, 16, 64)).lower(
        lowering_platforms=("cuda",))
    ks = launches(lowered)
    names = [k.name for k in ks]
    L = cfg.num_layers
    assert names == ["ferry_write_kv", "ferry_paged_attention", "ferry_prefill_attention"] * L
    for w in ks[::3]:
        assert w.aliases == [(0, 4), (1, 5)]
    main = lowered.as_text().split("func.func public @main(", 1)[1].split("\n", 1)[0]
    assert re.findall(r"tf\.aliasing_output = (\d+)", main) == ["0", "1"]


def test_engine_sample_program_lowers_with_pallas_compaction(gpu_runner):
    """The step's ``sample`` program for CUDA: the sampler's and the finished rows' compactions
    (count kernel, then scatter) and the donated slot state aliased to its outputs."""
    runner, cfg, _, _ = gpu_runner
    R = runner.ecfg.max_batch
    st = _state_sds(R, runner.ecfg.max_pages_per_seq, cfg.vocab_size)
    lowered = runner.programs["sample"].fn.trace(st, SDS((R, cfg.vocab_size), jnp.float32), SDS((R,), I32),
                                                 SDS((R,), I32)).lower(lowering_platforms=("cuda",))
    names = [k.name for k in launches(lowered)]
    assert names and names == ["ferry_nonzero_count", "ferry_nonzero_scatter"] * (len(names) // 2)
    main = lowered.as_text().split("func.func public @main(", 1)[1].split("\n", 1)[0]
    n_state = len(jax.tree.leaves(st))
    assert re.findall(r"tf\.aliasing_output = (\d+)", main) == [str(i) for i in range(n_state)]


def test_engine_decode_loop_lowers_with_pallas_kernels(gpu_runner):
    """The multi-step decode program (``lax.while_loop`` over K iterations, sampling inside) for CUDA:
    per layer a K/V write then paged attention inside the loop body, compaction kernels for the
    sampler and the stopped rows, and the donated caches and slot state aliased to the outputs."""
    runner, cfg, params, cache = gpu_runner
    B, C = 4, 64
    st = _state_sds(runner.ecfg.max_batch, runner.ecfg.max_pages_per_seq, cfg.vocab_size)
    fn = runner.programs["decode"].fn((B, C))
    lowered = fn.trace(params, cache, cache, st, SDS((B,), I32), SDS((), I32)).lower(lowering_platforms=("cuda",))
    ks = launches(lowered)
    names = [k.name for k in ks]
    assert names[:2 * cfg.num_layers] == ["ferry_write_kv", "ferry_paged_attention"] * cfg.num_layers
    assert set(names[2 * cfg.num_layers:]) == {"ferry_nonzero_count", "ferry_nonzero_scatter"}
    for w in ks[:2 * cfg.num_layers:2]:
        assert w.aliases == [(0, 4), (1, 5)]
    main = lowered.as_text().split("func.func public @main(", 1)[1].split("\n", 1)[0]
    n_state = len(jax.tree.leaves(st))
    assert re.findall(r"tf\.aliasing_output = (\d+)", main) == [str(i) for i in range(2 + n_state)]


def test_engine_sampling_lowers_with_pallas_compaction(gpu_runner):
    """The step's sampler with a 32k vocabulary (4 rows): inside the truncation ``lax.cond`` the
    candidate-tier compactions (GPU "auto" select) all lower, each count kernel followed by its
    scatter, and the largest runs over the whole [4, V] mask."""
    from ferry.engine.model_runner import _slot_batch
    from ferry.engine.sampling import Penalties, sample
    V, R = 32768, 4
    st = _state_sds(R, 4, V)

    def f(state, lg):
        sb = _slot_batch(state, jnp.arange(R))
        return sample(lg, sb, lambda: Penalties(state.penalties.counts, state.penalties.seen), select="auto",
                      compaction_impl="pallas")

    ks = launches(jax.jit(f).trace(st, SDS((R, V), jnp.float32)).lower(lowering_platforms=("cuda",)))
    names = [k.name for k in ks]
    assert len(ks) >= 2 and names == ["ferry_nonzero_count", "ferry_nonzero_scatter"] * (len(ks) // 2)
    assert max(k.grid[0] for k in ks[::2]) >= V // 1024


# ----------------------------------------------------------------------------- TPU (Mosaic)
@functools.lru_cache(maxsize=None)
def _tpu_mesh(kind):
    """An abstract one-device mesh on a TPU chip ``kind``: what the Mosaic lowering asks for its generation."""
    try:
        from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh
        return use_abstract_mesh, AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
            device_kind=kind, num_cores=1, platform="tpu"))
    except (ImportError, TypeError) as e:
        pytest.skip(f"abstract TPU device unavailable: {e}")


@pytest.mark.parametrize("kind", ["TPU v4", "TPU v5 lite", "TPU v6 lite"])
@pytest.mark.parametrize("S", [16, 128])
@pytest.mark.parametrize("G,Dh", [(1, 128), (3, 64), (8, 128), (3, 80)])
def test_tpu_variant_lowers_to_mosaic(mosaic_modules, kind, S, G, Dh):
    """The Mosaic TPU decode variant: one ``tpu_custom_call``, grid (B, Hkv, P_max) with the page axis
    sequential, 3 scalar-prefetch operands (lengths, tables, layer) and 3 scratch buffers, one page of
    K/V per step ([S, Dh] window), two matmuls, soft cap only when asked, bf16 and f32.
    On a CPU host only under an abstract mesh naming a TPU: without it the lowering asks the default
    (CPU) device for its TPU generation and fails with "Unsupported TPU device kind: cpu"."""
    B, Hkv, P_max = 2, 2, 9
    for dtype in (jnp.bfloat16, jnp.float32):
        for cap in (None, 20.0):
            mosaic_modules.clear()
            args = _pa_args(B, G * Hkv, Hkv, Dh, S, P_max, dtype)
            use_mesh, mesh = _tpu_mesh(kind)
            with use_mesh(mesh):
                lowered = _lower(lambda q, k, v, bt, sl, layer: paged_attention(
                    q, k, v, layer, bt, sl, scale=0.1, soft_cap=cap, backend="tpu"), *args, platform="tpu")
            assert len(launches(lowered, target="tpu_custom_call")) == 1
            [m] = mosaic_modules
            assert f"iteration_bounds = array<i64: {B}, {Hkv}, {P_max}>" in m
            assert ("dimension_semantics = [#tpu.dimension_semantics<parallel>, #tpu.dimension_semantics<parallel>, "
                    "#tpu.dimension_semantics<arbitrary>]") in m
            assert "scalar_prefetch = 3 : i64, scratch_operands = 3 : i64" in m
            assert m.count(f"window_bounds = array<i64: 1, 1, 1, {S}, {Dh}>") == 2      # K, V: one page
            assert m.count(f"window_bounds = array<i64: 1, 1, {G}, {Dh}>") == 2         # q, out
            assert m.count("tpu.matmul") == 2
            assert ("math.tanh" in m) == (cap is not None)


# ----------------------------------------------------------------------------- Mosaic GPU decode variant
MOSAIC_GPU = "mosaic_gpu_v2"


def _mosaic_gpu_module(op) -> str:
    """The NVVM-level module a ``mosaic_gpu_v2`` custom call carries (bytecode, serialized by Mosaic
    GPU's serde pass; deserialized here with that pass, so the text names the PTX it will become)."""
    from jax._src.lib.mlir import passmanager
    from jax.experimental.mosaic.gpu import dialect as mgpu_dialect
    cfg = ir.DictAttr(op.attributes["mhlo.backend_config"])
    ctx = jax_mlir.make_ir_context()
    mgpu_dialect.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True
    with ctx:
        module = ir.Module.parse(ir.StringAttr(cfg["module"]).value_bytes)
        passmanager.PassManager.parse("builtin.module(mosaic_gpu-serde{serialize=false})", ctx).run(module.operation)
        return str(module)


def _walk(module):
    """Every operation of ``module``, nested regions included."""
    def visit(op):
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    yield o
                    yield from visit(o.operation)
    yield from visit(module.operation)


def _lower_mgpu(args, **kw):
    from ferry.kernels.paged_attention_mosaic_gpu import paged_attention as mgpu_paged_attention
    return _lower(lambda q, k, v, bt, sl, layer: mgpu_paged_attention(q, k, v, layer, bt, sl, scale=0.1, **kw), *args)


@pytest.mark.parametrize("dt", ["bf16", "f16"])
@pytest.mark.parametrize("S", [16, 32, 64])
@pytest.mark.parametrize("G,Dh", [(1, 128), (4, 128), (8, 64)])
def test_mosaic_gpu_variant_lowers_for_hopper(G, Dh, S, dt):
    """Pallas -> Mosaic GPU -> NVVM on the CPU host, for sm_90: one ``mosaic_gpu_v2`` launch taking q
    padded to 64 rows, the caches whole (no per-layer copy) and one 128-byte-aligned meta row per batch
    row; inside, the TMA copies (meta, q, then K and V one page each: the prologue fills the ring, the
    loop refills one slot), one TMA store, and WGMMA m64 instructions for q @ K^T (K = Dh) and p @ V
    (K = 64 tokens); tanh only with the soft cap; for 1 and 3 ring slots."""
    dtype, ir_t = {"bf16": (jnp.bfloat16, "bf16"), "f16": (jnp.float16, "f16")}[dt]
    B, Hkv, P_max = 3, 2, 24
    args = _pa_args(B, G * Hkv, Hkv, Dh, S, P_max, dtype)
    ppb = 64 // S
    for steps, cap in ((1, None), (3, 30.0)):
        lowered = _lower_mgpu(args, max_concurrent_steps=steps, soft_cap=cap)
        module = lowered.compiler_ir("stablehlo")                         # keeps the ops below alive
        ops = [o for o in _walk(module) if o.operation.name == "stablehlo.custom_call"
               and ir.StringAttr(o.attributes["call_target_name"]).value == MOSAIC_GPU]
        assert len(ops) == 1 and not launches(lowered, target=TRITON)
        op = ops[0]
        types = [str(x.type) for x in op.operands]
        P = B * P_max + 1
        assert types[:3] == [f"tensor<{B}x{Hkv}x64x{Dh}x{ir_t}>", f"tensor<2x{Hkv}x{P}x{S}x{Dh}x{ir_t}>",
                             f"tensor<2x{Hkv}x{P}x{S}x{Dh}x{ir_t}>"]
        width = int(re.match(rf"tensor<{B}x(\d+)xi32>", types[3]).group(1))
        assert width % 32 == 0 and width >= 4 + P_max and len(types) == 4
        assert [str(r.type) for r in op.results] == [f"tensor<{B}x{Hkv}x64x{Dh}x{ir_t}>"]
        m = _mosaic_gpu_module(op)
        assert "mosaic_gpu.arch_major = 9" in m and "mosaic_gpu.arch_minor = 0" in m
        loads = m.count("nvvm.cp.async.bulk.tensor.shared.cluster.global")
        assert loads == m.count("nvvm.mbarrier.arrive.expect_tx") == 2 + 2 * ppb * (steps + 1), loads
        assert m.count("nvvm.cp.async.bulk.tensor.global.shared.cta") == 1           # the output tile
        mma = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16", m)
        assert sorted(mma) == sorted(["64"] * (Dh // 16) + [str(Dh)] * 4), mma    # q @ K^T, p @ V
        assert ("tanh" in m) == (cap is not None)

"""Runs the model: static-shape jitted prefill and decode steps over bucketed shapes.

Decode step  (B rows, C context):  tokens/positions/slots/seq_lens i32[B],
    block_tables i32[B, C/S] -> logits f32[B, V].
Prefill step (T tokens, C context): one request's chunk, tokens/positions/slots
    i32[T], block_table i32[1, C/S], last i32[] (row whose logits are sampled).
Sampling step (B rows): logits, sampling rows [B], max_tokens i32[B] -> next token,
    logprobs and the compacted indices + count of rows that finished (stop id or
    max_tokens). A separate program, so it is compiled once per batch size rather
    than once per (batch, context) bucket: the logits stay on device between them.
The KV cache buffers are donated every call and rebound, so XLA updates them in
place. ``warmup()`` compiles every shape in ``EngineConfig.buckets()``.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np

from ferry.engine.compile_guard import CompileGuard
from ferry.engine.config import Buckets, EngineConfig
from ferry.engine.kv_cache import KVCache
from ferry.engine.sharding import to_host
from ferry.engine.sampling import SamplingBatch, host_rows, sample
from ferry.kernels.compaction import nonzero
from ferry.models.config import ModelConfig
from ferry.models.llama import AttnMeta, Llama, logits


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    tokens: jax.Array         # i32[N]
    positions: jax.Array      # i32[N]   -1 = padding
    slots: jax.Array          # i32[N]   -1 = padding
    block_tables: jax.Array   # i32[B, P]
    seq_lens: jax.Array       # i32[B]   decode: tokens attended (0 = padding row)
    max_tokens: jax.Array     # i32[B]
    last: jax.Array           # i32[B]   row of the hidden states to sample (prefill)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutputs:
    tokens: jax.Array         # i32[B]
    logprob: jax.Array        # f32[B]
    top_ids: jax.Array        # i32[B, 20]
    top_logprobs: jax.Array   # f32[B, 20]
    finished_idx: jax.Array   # i32[B]   compacted rows that finished, -1 padded
    num_finished: jax.Array   # i32[]


def _forward(cfg: ModelConfig, model: Llama, params, k, v, x: StepInputs):
    """The model program: logits f32[B, V] at the rows' last tokens, and the updated caches."""
    meta = AttnMeta(x.slots, x.block_tables, x.seq_lens)
    h, k, v = model.apply({"params": params}, x.tokens, x.positions, k, v, meta)
    return logits(cfg, params, h[x.last]), k, v


def _sample_step(lg, sb: SamplingBatch, max_tokens, *, compaction_impl: str = "auto",
                 sampling_select: str = "auto") -> StepOutputs:
    """The sampling program (one per batch size, shared by every context bucket and by prefill)."""
    tok, lp, top_ids, top_lp, hit_stop = sample(lg, sb, select=sampling_select, compaction_impl=compaction_impl)
    done = (max_tokens > 0) & (hit_stop | (sb.step + 1 >= max_tokens))
    idx, n = nonzero(done, size=done.shape[0], impl=compaction_impl)
    return StepOutputs(tok, lp, top_ids, top_lp, idx, n)


@dataclasses.dataclass(frozen=True)
class Row:
    """One sequence's work in a step (host side)."""

    tokens: list[int]          # tokens to compute (1 for decode)
    start: int                 # position of tokens[0]
    block_table: list[int]     # device pages of the request
    max_tokens: int            # the request's max_tokens (0 = do not count as finished)
    sampling: tuple            # (params, seed, step, all tokens, num_prompt, stop ids)


class ModelRunner:
    """Owns the jitted steps. With a tensor-parallel ``mesh``, ``params`` are already
    sharded (engine/sharding.py) and the steps take explicit in/out shardings:
    params as placed, KV pages split by KV head, everything else replicated."""

    def __init__(self, model_cfg: ModelConfig, params, ecfg: EngineConfig, kv: KVCache, dtype,
                 guard: CompileGuard, mesh=None) -> None:
        self.cfg, self.params, self.ecfg, self.kv, self.guard = model_cfg, params, ecfg, kv, guard
        self.buckets: Buckets = ecfg.buckets()
        self.page_size = ecfg.page_size
        self.mesh = mesh
        mk = lambda mode: Llama(model_cfg, mode=mode, dtype=dtype, attn_impl=ecfg.attn_impl, mesh=mesh)  # noqa: E731
        jit_kw: dict = {"donate_argnums": (1, 2)}
        sample_kw: dict = {}
        self._replicated = None
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec as P
            rep = self._replicated = NamedSharding(mesh, P())
            p_sh = jax.tree.map(lambda a: a.sharding, params)
            jit_kw.update(in_shardings=(p_sh, kv.sharding, kv.sharding, rep),
                          out_shardings=(rep, kv.sharding, kv.sharding))
            sample_kw.update(in_shardings=(rep, rep, rep), out_shardings=rep)
        comp = "pallas" if ecfg.attn_impl == "pallas" else "auto"       # "pallas": every kernel in Pallas
        self._decode = jax.jit(functools.partial(_forward, model_cfg, mk("decode")), **jit_kw)
        self._prefill = jax.jit(functools.partial(_forward, model_cfg, mk("prefill")), **jit_kw)
        self._sample = jax.jit(functools.partial(_sample_step, compaction_impl=comp,
                                                 sampling_select=ecfg.sampling_select), **sample_kw)
        self.history_len = ecfg.max_model_len       # penalty history: one sampling program per batch size

    # ------------------------------------------------------------------ host -> arrays
    def _inputs(self, rows: list[Row], B: int, N: int, C: int, prefill: bool):
        S, P = self.page_size, C // self.page_size
        tokens = np.zeros(N, np.int32)
        positions = np.full(N, -1, np.int32)
        slots = np.full(N, -1, np.int32)
        tables = np.zeros((B, P), np.int32)
        seq_lens = np.zeros(B, np.int32)
        max_tokens = np.zeros(B, np.int32)
        last = np.zeros(B, np.int32)
        i = 0
        for r, row in enumerate(rows):
            n = len(row.tokens)
            pos = np.arange(row.start, row.start + n, dtype=np.int32)
            bt = np.asarray(row.block_table[:P], np.int32)
            tokens[i:i + n] = row.tokens
            positions[i:i + n] = pos
            slots[i:i + n] = bt[pos // S] * S + pos % S
            tables[r, :len(bt)] = bt
            seq_lens[r] = row.start + n
            max_tokens[r] = row.max_tokens
            last[r] = i + n - 1
            i += n
        x = StepInputs(tokens, positions, slots, tables, seq_lens, max_tokens, last)
        sb = SamplingBatch(**host_rows([row.sampling for row in rows], B, self.history_len))
        if self._replicated is not None and jax.process_count() > 1:
            from ferry.engine.sharding import put_global           # numpy is not a global array across hosts
            x, sb = jax.tree.map(lambda a: put_global(a, self._replicated), (x, sb))
        return x, sb

    def _run(self, fn, x, sb, where: str):
        with self.guard.watch(where):
            lg, self.kv.k, self.kv.v = fn(self.params, self.kv.k, self.kv.v, x)
            return to_host(self._sample(lg, sb, x.max_tokens))

    def decode(self, rows: list[Row]) -> StepOutputs:
        """One token for each row (rows: at most max_batch)."""
        B = Buckets.pick(self.buckets.decode_batch, len(rows))
        C = Buckets.pick(self.buckets.decode_context, max(r.start + 1 for r in rows))
        x, sb = self._inputs(rows, B, B, C, prefill=False)
        return self._run(self._decode, x, sb, f"decode B={B} C={C}")

    def prefill(self, row: Row) -> StepOutputs:
        """One chunk of one request; the output row 0 is the sample at its last token."""
        T = Buckets.pick(self.buckets.prefill_tokens, len(row.tokens))
        C = Buckets.pick(self.buckets.context, row.start + len(row.tokens))
        x, sb = self._inputs([row], 1, T, C, prefill=True)
        return self._run(self._prefill, x, sb, f"prefill T={T} C={C}")

    # ------------------------------------------------------------------ warm-up
    def warmup(self, progress: bool = True) -> float:
        """Compile every bucket shape (decode, prefill, swaps); returns seconds."""
        t0 = time.perf_counter()
        shapes = [("decode", b, c) for b, c in self.buckets.decode_shapes()]
        shapes += [("prefill", t, c) for t, c in self.buckets.prefill_shapes()]
        it = shapes
        if progress:
            from tqdm import tqdm
            it = tqdm(shapes, desc="ferry: compiling step programs", unit="prog", leave=False)
        for mode, n, c in it:
            B = n if mode == "decode" else 1
            x, sb = self._inputs([], B, n, c, prefill=mode == "prefill")
            fn = self._decode if mode == "decode" else self._prefill
            lg, self.kv.k, self.kv.v = fn(self.params, self.kv.k, self.kv.v, x)
            self._sample(lg, sb, x.max_tokens)
        jax.block_until_ready(self.kv.k)
        self.kv.warmup()
        self.guard.arm()
        return time.perf_counter() - t0

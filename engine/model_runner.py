"""Runs the model: static-shape step programs over bucketed shapes, batch state on device.

Programs (engine/programs.py; every shape is in ``EngineConfig.buckets()``):

* ``step[T, C]``: the forward of one ragged step (engine/step_inputs.py): decode rows and
  prefill chunks of several requests in one token array of T tokens, one forward with the
  K/V write inside, ragged paged attention over the rows (kernels/ragged_attention.py),
  and the logits of every row that ends its request's known tokens. Decode rows read
  their input token from their slot.
* ``sample[R]``: dispatched right after ``step`` (no host sync in between): sampling on
  device for those R rows; the token goes into the row's slot (``SlotState.tokens``), so
  the next step reads it on device. It is its own program, keyed by rows only, so the
  step programs do not each compile the sampler again (default model, 2-core CPU: the
  sampler alone compiles in 2.7 s wall, a step program in 12-15 s;
  benchmarks/results/compile_cpu_2core.json).
* ``decode[B, C]``: up to ``decode_steps`` decode iterations of B slots in one
  ``lax.while_loop`` (forward, K/V write, sampling, penalty statistics), each
  iteration feeding the sampled tokens to the next on device. A row stops at a
  stop id or its max_tokens; the loop exits when every row stopped or after
  ``n_steps`` (dynamic, <= K). Rows that stopped are compacted on device
  (``kernels.compaction.nonzero``): the host reads a count and a few indices.
* ``apply_rows[n]`` / ``set_penalties``: the host's slot updates (engine/slots.py).

C is the largest context a program serves; its attention switches on device among the
context buckets up to C (engine/config.py ``Buckets``; ``kernels/ragged_attention.by_context``).
A fully warmed engine (``ferry serve``) builds only C = the largest bucket, one program per B
or T; a lazy one (``ferry generate``) builds the smallest C that holds its rows
(``ModelRunner._context``), so a short answer compiles one-bucket programs.

KV caches and the slot state are donated to every program that changes them, so
XLA updates them in place. Outputs are copied to the host asynchronously as soon
as a program is dispatched (``copy_to_host_async``); the host reads them when it
needs the tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ferry.engine.compile_guard import CompileGuard
from ferry.engine.config import Buckets, EngineConfig
from ferry.engine.kv_cache import KVCache
from ferry.engine.programs import Program
from ferry.engine.sampling import Penalties, SamplingBatch, sample
from ferry.engine.sampling_params import MAX_LOGPROBS
from ferry.engine.slots import RowUpdate, SlotState, apply_rows, empty_state, set_penalties
from ferry.kernels.compaction import nonzero
from ferry.models.config import ModelConfig
from ferry.engine.step_inputs import StepInputs, StepRow, StepShape, fits, pack
from ferry.kernels.ragged_attention import RaggedLayout
from ferry.models.attention import AttnMeta, op_impl
from ferry.models.llama import Llama, logits


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutputs:
    """What the host reads after a dispatch. K = decode iterations (1 for ``sample``)."""

    tokens: jax.Array         # i32[K, B]  -1 where the row produced no token
    logprob: jax.Array        # f32[K, B]
    top_ids: jax.Array        # i32[K, B, MAX_LOGPROBS]
    top_logprobs: jax.Array   # f32[K, B, MAX_LOGPROBS]
    num_tokens: jax.Array     # i32[B]     tokens each row produced
    finished_idx: jax.Array   # i32[B]     rows that stopped on device (stop id / max_tokens), -1 padded
    num_finished: jax.Array   # i32[]


def _slot_batch(state: SlotState, rows) -> SamplingBatch:
    return jax.tree.map(lambda a: a[rows], state.sampling)


def _record(state: SlotState, rows, live, tok, positions, hit):
    """Write sampled tokens of ``live`` rows back into their slots and the penalty statistics.
    A row that sampled a stop id (``hit``) gets max_tokens 0: later dispatches skip it even before
    the host has read that it finished."""
    S = state.tokens.shape[0]
    idx = jnp.where(live, rows, S)                             # dead rows -> dropped
    sb = state.sampling
    sb = dataclasses.replace(sb, step=sb.step.at[idx].add(1, mode="drop"),
                             max_tokens=sb.max_tokens.at[jnp.where(live & hit, rows, S)].set(0, mode="drop"))
    pen = Penalties(state.penalties.counts.at[idx, tok].add(1.0, mode="drop"),
                    state.penalties.seen.at[idx, tok].set(True, mode="drop"))
    return SlotState(state.tokens.at[idx].set(tok, mode="drop"), state.positions.at[idx].set(positions, mode="drop"),
                     state.block_tables, sb, pen)


def _live(state: SlotState, rows, safe):
    """bool[B]: which of ``rows`` (slots, -1 = padding; ``safe``: the same clipped into range)
    still have tokens to produce."""
    sb = _slot_batch(state, safe)
    return (rows >= 0) & (sb.max_tokens > 0) & (sb.step < sb.max_tokens)


def _sample_into(state: SlotState, lg, rows, safe, live, next_pos, *, select: str, compaction_impl: str):
    """Sample one token per row from ``lg`` f32[B, V] with each slot's parameters and penalty
    statistics, and record it in the slots of ``live`` rows (at ``next_pos``). Returns the new
    state, (tokens, logprob, top_ids, top_logprobs) and ``done``: live rows that stopped (a stop
    id, or max_tokens reached)."""
    sb = _slot_batch(state, safe)
    pen = lambda: Penalties(state.penalties.counts[safe], state.penalties.seen[safe])   # noqa: E731
    tok, lp, top_ids, top_lp, hit = sample(lg, sb, pen, select=select, compaction_impl=compaction_impl)
    state = _record(state, rows, live, tok, next_pos, hit)
    done = live & (hit | (sb.step + 1 >= sb.max_tokens))
    return state, (tok, lp, top_ids, top_lp), done


def _step(cfg: ModelConfig, model: Llama, params, k, v, state: SlotState, x: StepInputs):
    """The forward of one ragged step (see module docstring). Returns the caches, the logits
    f32[R, V] of the sampled rows, their slots i32[R] (-1 = padding) and next positions i32[R]:
    the ``sample`` program's inputs, left on device."""
    S = state.tokens.shape[0]
    T = x.tokens.shape[0]
    tok = jnp.where(x.from_slot >= 0, state.tokens[jnp.clip(x.from_slot, 0, S - 1)], x.tokens)
    h, k, v = model.apply({"params": params}, tok, x.positions, k, v, x.meta)
    at = jnp.clip(x.sample_token, 0, T - 1)
    return k, v, logits(cfg, params, h[at]), x.sample_slot, x.positions[at] + 1


def _sample_rows(state: SlotState, lg, rows, next_pos, *, select: str, compaction_impl: str):
    """Sample one token for each of ``rows`` (i32[R] slots, -1 = padding) from ``lg`` f32[R, V]
    into their slots; outputs have K = 1 and one row per sampled row."""
    safe = jnp.clip(rows, 0, state.tokens.shape[0] - 1)
    live = _live(state, rows, safe)
    state, (tok, lp, top_ids, top_lp), done = _sample_into(state, lg, rows, safe, live, next_pos, select=select,
                                                           compaction_impl=compaction_impl)
    idx, n = nonzero(done, size=rows.shape[0], impl=compaction_impl)
    out = StepOutputs(jnp.where(live, tok, -1)[None], lp[None], top_ids[None], top_lp[None],
                      live.astype(jnp.int32), idx, n)
    return state, out


def _decode(cfg: ModelConfig, model: Llama, K: int, page_size: int, ctx_pages: int, params, k, v,
            state: SlotState, rows, n_steps, *, select: str, compaction_impl: str,
            context_pages: tuple[int, ...] = ()):
    """Up to ``n_steps`` (<= K) decode iterations of the slots ``rows`` (i32[B], -1 = padding) over
    the first ``ctx_pages`` pages of each row's block table; each iteration's attention reads only
    the smallest of ``context_pages`` (page-count buckets, the last ``ctx_pages``) that holds its rows."""
    B = rows.shape[0]
    safe = jnp.where(rows < 0, 0, rows)
    P = ctx_pages
    tables = state.block_tables[safe, :P]                      # i32[B, P]
    C = P * page_size
    live0 = _live(state, rows, safe)

    N = MAX_LOGPROBS
    outs0 = StepOutputs(jnp.full((K, B), -1, jnp.int32), jnp.zeros((K, B), jnp.float32),
                        jnp.zeros((K, B, N), jnp.int32), jnp.zeros((K, B, N), jnp.float32),
                        jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32), jnp.zeros((), jnp.int32))

    def cond(c):
        i, _, _, _, live, _ = c
        return (i < n_steps) & jnp.any(live)

    def body(c):
        i, k, v, st, live, o = c
        tok_in = st.tokens[safe]
        pos = st.positions[safe]
        ok = live & (pos < C)
        slot_map = jnp.where(ok, tables[jnp.arange(B), jnp.minimum(pos // page_size, P - 1)] * page_size
                             + pos % page_size, -1)
        meta = AttnMeta(slot_map, RaggedLayout.decode(tables, jnp.where(ok, pos + 1, 0), context_pages))
        h, k, v = model.apply({"params": params}, tok_in, jnp.where(ok, pos, 0), k, v, meta)
        lg = logits(cfg, params, h)
        st, (tok, lp, top_ids, top_lp), done = _sample_into(st, lg, rows, safe, ok, pos + 1, select=select,
                                                            compaction_impl=compaction_impl)
        o = StepOutputs(o.tokens.at[i].set(jnp.where(ok, tok, -1)), o.logprob.at[i].set(lp),
                        o.top_ids.at[i].set(top_ids), o.top_logprobs.at[i].set(top_lp),
                        o.num_tokens + ok.astype(jnp.int32), o.finished_idx, o.num_finished)
        return i + 1, k, v, st, ok & ~done, o

    _, k, v, state, live, o = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), k, v, state, live0, outs0))
    stopped = (rows >= 0) & (o.num_tokens > 0) & ~live
    idx, n = nonzero(stopped, size=B, impl=compaction_impl)
    return k, v, state, dataclasses.replace(o, finished_idx=idx, num_finished=n)


class ModelRunner:
    """Owns the step programs and the device slot state. With a tensor-parallel ``mesh``,
    ``params`` are already sharded (engine/sharding.py) and the programs take explicit
    in/out shardings: params as placed, KV pages split by KV head, the rest replicated."""

    def __init__(self, model_cfg: ModelConfig, params, ecfg: EngineConfig, kv: KVCache, dtype,
                 guard: CompileGuard, mesh=None, kernels=None) -> None:
        self.cfg, self.params, self.ecfg, self.kv, self.guard = model_cfg, params, ecfg, kv, guard
        self.buckets: Buckets = ecfg.buckets()
        self.page_size = ecfg.page_size
        self.mesh = mesh
        self.K = ecfg.decode_steps
        # ``kernels``: the engine's KernelChoice (kernels/selection.py), else one string for every op
        kernels = kernels if kernels is not None else ecfg.attn_impl
        model = Llama(model_cfg, dtype=dtype, attn_impl=kernels, mesh=mesh)
        comp = op_impl(kernels, "compaction") if not isinstance(kernels, str) else (
            "pallas" if kernels == "pallas" else "auto")
        samp = dict(select=ecfg.sampling_select, compaction_impl=comp)
        dec_kw: dict = {"donate_argnums": (1, 2, 3)}
        stp_kw: dict = {"donate_argnums": (1, 2)}
        smp_kw: dict = {"donate_argnums": (0,)}
        upd_kw: dict = {"donate_argnums": (0,)}
        pen_kw: dict = {"donate_argnums": (0,)}
        self._replicated = None
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec as P
            self._replicated = NamedSharding(mesh, P())
        self.reset_state()
        if mesh is not None:
            rep = self._replicated
            p_sh = jax.tree.map(lambda a: a.sharding, params)
            kvs = kv.sharding
            st = jax.tree.map(lambda _: rep, self.state)
            dec_kw.update(in_shardings=(p_sh, kvs, kvs, st, rep, rep), out_shardings=(kvs, kvs, st, rep))
            stp_kw.update(in_shardings=(p_sh, kvs, kvs, st, rep), out_shardings=(kvs, kvs, rep, rep, rep))
            smp_kw.update(in_shardings=(st, rep, rep, rep), out_shardings=(st, rep))
            upd_kw.update(in_shardings=(st, rep), out_shardings=st)
            pen_kw.update(in_shardings=(st, rep, rep, rep), out_shardings=st)
        self.programs = {
            "step": Program("step", jax.jit(functools.partial(_step, model_cfg, model), **stp_kw)),
            "sample": Program("sample", jax.jit(functools.partial(_sample_rows, **samp), **smp_kw)),
            "decode": Program("decode", lambda key: jax.jit(functools.partial(
                _decode, model_cfg, model, self.K, self.page_size, key[1] // self.page_size, **samp,
                context_pages=self._branches(self.buckets.decode_context, key[1])), **dec_kw), per_key=True),
            "apply_rows": Program("apply_rows", jax.jit(apply_rows, **upd_kw)),
            "set_penalties": Program("set_penalties", jax.jit(set_penalties, **pen_kw)),
        }

    def reset_state(self) -> None:
        """A fresh slot state (after a failed program consumed the donated one)."""
        state = empty_state(self.ecfg.max_batch, self.ecfg.max_pages_per_seq, self.cfg.vocab_size)
        self.state = jax.device_put(state, self._replicated) if self._replicated is not None else state

    # ------------------------------------------------------------------ host -> device
    def _put(self, tree):
        if self._replicated is not None and jax.process_count() > 1:
            from ferry.engine.sharding import put_global          # numpy is not a global array across hosts
            return jax.tree.map(lambda a: put_global(a, self._replicated), tree)
        return tree

    def apply_updates(self, update: RowUpdate | None, penalties: list) -> None:
        """Write the host's dirty slot rows and penalty uploads (engine/slots.py)."""
        with self.guard.watch("slot update"):
            if update is not None:
                n = update.idx.shape[0]
                self.state = self.programs["apply_rows"](n, self.state, self._put(update))
            for slot, counts, seen in penalties:
                self.state = self.programs["set_penalties"](1, self.state, *self._put(
                    (np.int32(slot), counts, seen)))

    def _branches(self, table: tuple[int, ...], C: int) -> tuple[int, ...]:
        """The context buckets (in pages) a program of largest context C switches among."""
        return Buckets.pages(tuple(c for c in table if c <= C), self.page_size)

    def _context(self, name: str, lead: int, table: tuple[int, ...], need: int) -> int:
        """The context key of program ``name`` (``(lead, C)``) for rows that need ``need`` tokens of
        context: the smallest already-built program that holds them (``ferry serve`` builds only the
        largest, which switches among every bucket), else the smallest bucket that holds them,
        built on first use (``ferry generate``: a short answer builds one-bucket programs)."""
        fit = [c for c in table if c >= need]
        if not fit:
            raise ValueError(f"{need} tokens of context exceed the largest compiled bucket {table[-1]}")
        built = self.programs[name].executables
        return next((c for c in fit if (lead, c) in built), fit[0])

    def step_shape(self, rows: list[StepRow]) -> StepShape:
        """The smallest bucket that holds the rows' tokens and chunks (engine/step_inputs.py)."""
        need = max(r.start + r.num_tokens for r in rows)
        for T in self.buckets.step_tokens:
            C = self._context("step", T, self.buckets.context, need)
            shape = StepShape(T, C, self.ecfg.max_batch, self._branches(self.buckets.context, C))
            if fits(shape, rows):
                return shape
        raise ValueError(f"{len(rows)} rows / {sum(r.num_tokens for r in rows)} tokens fit no step bucket "
                         f"{self.buckets.step_tokens}")

    def step(self, rows: list[StepRow]) -> tuple[StepOutputs, list[int]]:
        """One ragged step over ``rows`` (they fit one step: the scheduler's limits); returns the
        device outputs (being copied to the host) and the rows that sampled, in output-row order."""
        shape = self.step_shape(rows)
        x, sampled = pack(shape, rows, self.page_size)
        with self.guard.watch(f"step T={shape.tokens} C={shape.context}"):
            self.kv.k, self.kv.v, lg, rows, next_pos = self.programs["step"](
                (shape.tokens, shape.context), self.params, self.kv.k, self.kv.v, self.state, self._put(x))
        with self.guard.watch(f"sample R={shape.rows}"):
            self.state, out = self.programs["sample"](shape.rows, self.state, lg, rows, next_pos)
        _copy_async(out)
        return out, sampled

    def decode(self, slots: list[int], max_position: int, n_steps: int) -> StepOutputs:
        """Up to ``n_steps`` tokens for each slot (at most max_batch); ``max_position`` is the
        largest position of a row's next input token."""
        B = Buckets.pick(self.buckets.decode_batch, len(slots))
        C = self._context("decode", B, self.buckets.decode_context, max_position + n_steps)
        rows = np.full(B, -1, np.int32)
        rows[:len(slots)] = slots
        with self.guard.watch(f"decode B={B} C={C}"):
            self.kv.k, self.kv.v, self.state, out = self.programs["decode"](
                (B, C), self.params, self.kv.k, self.kv.v, self.state, *self._put((rows, np.int32(n_steps))))
        _copy_async(out)
        return out

    # ------------------------------------------------------------------ warm-up
    def shapes(self) -> list[tuple[str, tuple]]:
        """Every (program, bucket) the engine can dispatch."""
        b = self.buckets
        out = [("decode", (B, C)) for B, C in b.decode_shapes()]
        out += [("step", (T, C)) for T, C in b.step_shapes()]
        out += [("sample", R) for R in sorted({StepShape(T, C, self.ecfg.max_batch).rows
                                               for T, C in b.step_shapes()})]
        out += [("set_penalties", 1)] + [("apply_rows", n) for n in b.decode_batch]
        return out

    def example_args(self, name: str, key):
        """Arguments of the right shapes for ``name`` at ``key`` (no effect on the engine's state)."""
        if name == "step":
            x, _ = pack(StepShape(key[0], key[1], self.ecfg.max_batch, self._branches(self.buckets.context, key[1])),
                        [], self.page_size)
            return (self.params, self.kv.k, self.kv.v, self.state, self._put(x))
        if name == "sample":
            return (self.state, *self._put((np.zeros((key, self.cfg.vocab_size), np.float32),
                                             np.full(key, -1, np.int32), np.zeros(key, np.int32))))
        if name == "decode":
            B, C = key
            return (self.params, self.kv.k, self.kv.v, self.state, *self._put((np.full(B, -1, np.int32),
                                                                               np.int32(1))))
        if name == "set_penalties":
            V = self.cfg.vocab_size
            return (self.state, *self._put((np.int32(0), np.zeros(V, np.float32), np.zeros(V, bool))))
        if name == "apply_rows":
            from ferry.engine.sampling import host_rows
            P = self.ecfg.max_pages_per_seq
            u = RowUpdate(np.full(key, -1, np.int32), np.zeros(key, np.int32), np.zeros(key, np.int32),
                          np.zeros((key, P), np.int32), SamplingBatch(**host_rows([], key)), np.zeros(key, bool))
            return (self.state, self._put(u))
        raise KeyError(name)

    def warmup(self, progress: bool = True, shapes=None, workers: int | None = None) -> float:
        """Compile (or load from the executable cache) every program shape; returns seconds.

        Programs compile on ``workers`` threads (default: one per CPU core): XLA compiles
        outside the GIL, so on the 2-core CPU two threads take about half the wall time."""
        from concurrent.futures import ThreadPoolExecutor, as_completed
        t0 = time.perf_counter()
        shapes = self.shapes() if shapes is None else shapes
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(shapes), desc="ferry: compiling step programs", unit="prog", leave=False)
        workers = workers or min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futs = [pool.submit(self.programs[name].get, key, self.example_args(name, key)) for name, key in shapes]
            for f in as_completed(futs):
                f.result()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        self.kv.warmup()
        return time.perf_counter() - t0

    def program_stats(self) -> dict:
        return {n: {"compiled": p.compiled, "seconds": round(p.compile_seconds, 3)}
                for n, p in self.programs.items()}


def _copy_async(tree) -> None:
    for a in jax.tree.leaves(tree):
        try:
            a.copy_to_host_async()
        except (AttributeError, RuntimeError):
            pass

"""The engine loop: requests in, one scheduled dispatch per ``step()``, outputs out.

Single-threaded by design (``AsyncEngine`` runs it on its own thread). Each
step: ``Plan = scheduler.schedule(now)`` -> swap-out / swap-in copies -> the
slot rows that changed go to the device (engine/slots.py) -> one dispatch:
a ragged step when the plan has prefill chunks (chunks of several requests and
the decode rows in one program; a request's last chunk samples its next token
into its slot), else one decode dispatch for all decode rows, running up to
``plan.decode_steps`` iterations on device -> outputs read (copied
asynchronously since dispatch) -> tokens appended, detokenized, stop checks ->
``scheduler.on_step_done`` with the tokens each request produced.

Sampled tokens stay on device: the next decode reads them from the slot state.
The host uploads only rows that changed, so a steady decode batch costs one
dispatch and one read per ``decode_steps`` tokens.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ferry.engine.compile_guard import CompileGuard
from ferry.engine.config import EngineConfig, host_pages_for_swap_space, kv_budget_bytes
from ferry.engine.kv_cache import KVCache, page_bytes, pages_for_budget
from ferry.engine.model_runner import ModelRunner, StepOutputs
from ferry.engine.step_inputs import StepRow
from ferry.engine.outputs import RequestOutput, TokenLogprob
from ferry.engine.request import Request
from ferry.engine.sampling import SamplingRow, has_penalty, host_penalties
from ferry.engine.sampling_params import SamplingParams
from ferry.engine.slots import SlotRow, SlotTable
from ferry.models.llama import runtime_params
from ferry.scheduler.plan import Plan, WorkItem

log = logging.getLogger("ferry")


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    except KeyError:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


def enable_compile_cache(path: str | None) -> None:
    """Point JAX's persistent compilation cache at ``path``, or turn it off (None / empty).

    JAX opens its cache once per process, at the first compile, and keeps that directory; so
    when the setting changes (another engine in the same process) the cache is reset to take
    the new one. Off means off: an engine configured without a cache never serializes an
    executable (XLA:CPU's ``serialize()`` crashed the test process once, for a tensor-parallel
    Mistral step program in a long run, and was not reproducible alone)."""
    want = os.path.expanduser(path) if path else None
    if jax.config.jax_compilation_cache_dir != want:
        jax.config.update("jax_compilation_cache_dir", want)
        try:
            from jax._src import compilation_cache        # no public API resets the opened cache
            compilation_cache.reset_cache()
        except (ImportError, AttributeError):
            pass
    if want:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """One program call whose tokens the host has not read yet."""

    items: tuple[WorkItem, ...]   # its work items, in row order
    out: StepOutputs              # device outputs, being copied to the host
    decode: bool                  # it has decode rows (a decode dispatch, or a ragged step with some)


class LLMEngine:
    """Synchronous engine core. See module docstring.

    Public: ``add_request``, ``abort_request``, ``step``,
    ``has_unfinished_requests``, ``stats``; attributes ``tokenizer``,
    ``model_config``, ``model_name``, ``max_model_len``, ``config``.
    """

    def __init__(self, config: EngineConfig, bundle=None) -> None:
        from ferry.scheduler.scheduler import Scheduler

        t_start = time.perf_counter()
        self.config = config
        enable_compile_cache(config.compile_cache_dir)
        dtype = resolve_dtype(config.dtype)
        self.dtype = dtype
        if bundle is None and config.model and config.model.startswith("random:"):
            from ferry.models.random_weights import random_bundle
            on_device = jax.default_backend() != "cpu" and config.tensor_parallel == 1
            bundle = random_bundle(config.model, seed=config.seed, dtype=dtype if on_device else np.float32,
                                   on_device=on_device)
        if bundle is None:
            from ferry.models.registry import load_model
            bundle = load_model(config.model, dtype="float32", cache_dir=config.model_cache_dir)
        self.model_config = bundle.config
        self.tokenizer = bundle.tokenizer
        self.model_name = bundle.name
        self.max_model_len = min(config.max_model_len, self.model_config.max_position_embeddings)
        if self.max_model_len != config.max_model_len:
            config = dataclasses.replace(config, max_model_len=self.max_model_len)
            self.config = config
        # Tensor parallel: pad/replicate heads to divide the mesh, then shard (engine/sharding.py).
        self.mesh, kv_sharding, compute_cfg, params = None, None, self.model_config, bundle.params
        if config.tensor_parallel > 1:
            from jax.sharding import NamedSharding
            from ferry.engine import sharding as tp
            layout = tp.head_layout(compute_cfg.num_heads, compute_cfg.num_kv_heads, config.tensor_parallel)
            compute_cfg = tp.padded_config(compute_cfg, layout)
            params = tp.relayout_params(params, self.model_config, layout)
            self.mesh = tp.make_mesh(config.tensor_parallel)
            params = runtime_params(params)
            specs = tp.param_specs(params, compute_cfg, config.tensor_parallel)
            self.params = tp.shard_params(params, specs, self.mesh, dtype)
            kv_sharding = NamedSharding(self.mesh, tp.KV_SPEC)
        else:
            self.params = jax.tree.map(lambda a: jnp.asarray(a, dtype), runtime_params(params))
        self.compute_config = compute_cfg

        # XLA:CPU upcasts bf16 scatters by converting the whole cache (measured 600 ms per decode
        # step for SmolLM2), so on CPU the KV cache stays f32 whatever the weights' dtype.
        kv_dtype = jnp.float32 if jax.default_backend() == "cpu" else dtype
        num_pages = config.num_pages or self._pages_from_memory(kv_dtype)
        if config.num_host_pages is not None:
            host_pages = config.num_host_pages
        elif config.swap_space is not None:       # GiB per device (vLLM's --swap-space)
            tp_here = max(1, config.tensor_parallel // max(1, config.num_processes))
            host_pages = host_pages_for_swap_space(config.swap_space, page_bytes(compute_cfg, config.page_size,
                                                                                 kv_dtype), devices=tp_here)
        else:
            host_pages = num_pages
        self.guard = CompileGuard(strict=config.strict_compile_guard)
        self.kv = KVCache(compute_cfg, num_pages, config.page_size, host_pages, kv_dtype, config.buckets(),
                          self.guard, sharding=kv_sharding)
        from ferry.kernels.selection import CheckShape, choose_kernels
        tp = config.tensor_parallel                   # heads per device: what each shard's kernels see
        self.kernels = choose_kernels(config.attn_impl, shape=CheckShape(
            compute_cfg.num_heads // tp, max(1, compute_cfg.num_kv_heads // tp), compute_cfg.head_dim,
            config.page_size, dtype))
        self.runner = ModelRunner(compute_cfg, self.params, config, self.kv, dtype, self.guard, mesh=self.mesh,
                                  kernels=self.kernels)
        mc = self.model_config
        all_local = getattr(mc, "sliding_window", None) and all(mc.window(i) for i in range(mc.num_layers))
        self.scheduler = Scheduler(config.scheduler_config(num_pages, host_pages,
                                                           window=mc.sliding_window if all_local else None))
        self.slots = SlotTable(config.max_batch, config.max_pages_per_seq, config.buckets().decode_batch)
        self._requests: dict[str, Request] = {}
        self._pending_final: list[RequestOutput] = []
        self._rng = np.random.default_rng(config.seed)
        self._fixed_clock = False          # multi-host: step() uses only the leader's clock
        self.last_plan: Plan | None = None
        self.stats_totals = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "decode_dispatches": 0,
                             "decode_iterations": 0, "slot_rows_uploaded": 0, "step_failures": 0,
                             "ragged_steps": 0}
        self.healthy = True
        self._inflight: Dispatch | None = None   # a dispatch not read yet (dispatch-ahead)
        self.plan_check = None                   # multi-host: called with each plan before dispatch
        t_loaded = time.perf_counter()
        self.warmup_seconds = 0.0
        if config.warmup == "all":
            self.warmup_seconds = self.runner.warmup(progress=config.warmup_progress)
            self.guard.arm()
        else:
            self.runner.kv.warmup()
        self.timings = {"load_seconds": round(t_loaded - t_start, 3), "warmup_seconds": round(self.warmup_seconds, 3)}
        log.info("ferry: model %s (%s, %d layers), weights %s, KV %s, %d device / %d host pages of %d tokens, "
                 "%d decode steps per dispatch, %s, warm-up %s: %s", self.model_name,
                 self.model_config.architecture if hasattr(self.model_config, "architecture") else "llama",
                 self.model_config.num_layers, jnp.dtype(dtype).name, jnp.dtype(kv_dtype).name, num_pages,
                 host_pages, config.page_size, config.decode_steps, self.kernels.summary(), config.warmup,
                 self.runner.program_stats())

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        return cls(config)

    def _pages_from_memory(self, dtype) -> int:
        """GPU/TPU: a fraction of free device memory. CPU: enough for every slot at
        full length, capped by cpu_kv_budget_gb."""
        dev = jax.devices()[0]
        stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
        if stats and "bytes_limit" in stats:
            budget = kv_budget_bytes(stats["bytes_limit"], stats.get("bytes_in_use", 0),
                                     self.config.kv_memory_fraction, self.config.gpu_memory_utilization)
            # KV heads are split over the mesh: a page costs 1/tp of its bytes on each device.
            return pages_for_budget(self.compute_config, self.config.page_size, dtype,
                                    budget * self.config.tensor_parallel)
        need = self.config.max_batch * self.config.max_pages_per_seq + 1
        cap = pages_for_budget(self.model_config, self.config.page_size, dtype,
                               self.config.cpu_kv_budget_gb * 2**30)
        return min(need, cap)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0, now: float | None = None, length_hint: int | None = None) -> None:
        """Validate and queue a request; raises ValueError with a clear message on bad input.
        ``length_hint``: predicted output tokens (a client's or a length predictor's); the MLFQ ranks by it
        (``scheduler/mlfq.py``, change 11), other policies ignore it."""
        from ferry.models.detokenizer import IncrementalDetokenizer

        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                                                       for t in prompt):
            text, ids = None, [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids out of range [0, {self.model_config.vocab_size}): {bad[:5]}")
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(ids) + params.max_tokens} exceeds the context length max_model_len={self.max_model_len}")
        stop_ids = params.device_stop_ids(self.tokenizer.eos_token_ids)   # ValueError over MAX_STOP_IDS
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**31 - 1))
        req = Request(request_id, text, ids, params, seed, stop_ids, IncrementalDetokenizer(self.tokenizer),
                      priority=priority)
        self.scheduler.add(request_id, len(ids), params.max_tokens, time.monotonic() if now is None else now,
                           priority=priority, length_hint=length_hint)
        self._requests[request_id] = req
        self.stats_totals["prompt_tokens_total"] += len(ids)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its pages; the next step() returns its final output."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.abort(request_id)
        self.slots.release(request_id)
        req.finish("abort")
        self._pending_final.append(req.output())

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending_final)

    # ------------------------------------------------------------------ the step
    def step(self, now: float | None = None) -> list[RequestOutput]:
        """Run one dispatch; return outputs of requests that progressed or ended.

        ``now`` (monotonic seconds) is the scheduler's clock; multi-host runs pass
        the leader's so every process makes the same decisions.
        """
        if not self.healthy:                              # a previous recovery failed: try again first,
            try:                                          # at most ten times a second
                self._recover()
            except Exception:
                time.sleep(0.1)
                raise
        now = time.monotonic() if now is None else now
        outputs, self._pending_final = self._pending_final, []
        if not self._requests:
            self._inflight = None                         # its requests were all aborted
            return outputs
        try:
            return outputs + self._step(now)
        except Exception as exc:
            log.exception("ferry: engine step failed; ending %d requests and rebuilding the KV cache",
                          len(self._requests))
            self.stats_totals["step_failures"] += 1
            self._pending_final[:0] = outputs             # finals taken before the failure are not lost
            self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
            self._recover()
            raise

    def _fail_all(self, message: str) -> None:
        """End every live request with finish reason "error" (their final outputs come with the next step)."""
        for rid, req in list(self._requests.items()):
            self.scheduler.abort(rid)
            req.error = message
            req.finish("error")
            self._pending_final.append(req.output())
        self._requests.clear()

    def _recover(self) -> None:
        """Rebuild what a failed program may have consumed: donated KV buffers and the slot state.

        ``healthy`` is False from the failure until this returns (``/health`` answers 503)."""
        self.healthy = False
        self._inflight = None
        self.kv.rebuild_device()
        self.runner.reset_state()
        self.slots.reset()
        self.healthy = True

    def _step(self, now: float) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        prev, self._inflight = self._inflight, None
        self.kv.finish_swaps()                            # last step's swap-outs: into host pages now
        plan: Plan = self.scheduler.schedule(now)
        self.last_plan = plan
        if self.plan_check is not None:
            self.plan_check(plan)                         # raises on every process if plans diverged
        if plan.swap_out:
            self.kv.swap_out(list(plan.swap_out))
        if plan.swap_in:
            self.kv.swap_in(list(plan.swap_in))
        slot_of = self._bind_slots(plan)
        if self.slots.pending():
            update, pens = self.slots.take_updates()
            self.stats_totals["slot_rows_uploaded"] += (int((update.idx >= 0).sum()) if update is not None else 0)
            self.runner.apply_updates(update, pens)
        dispatched: list[Dispatch] = []                   # in dispatch order
        decodes = plan.decode_items
        if plan.prefill_items:                            # one ragged step: chunks and decode rows together
            rows = []
            for w in plan.work:
                pages = self.scheduler.block_table(w.request_id)
                slot = slot_of[w.request_id] if w.sample else None
                toks = None if (w.num_tokens == 1 and w.sample) else \
                    self._requests[w.request_id].tokens[w.start:w.start + w.num_tokens]
                rows.append(StepRow(w.start, w.num_tokens, pages, toks, slot))
            out, sampled = self.runner.step(rows)
            self.stats_totals["ragged_steps"] += 1
            if sampled:
                dispatched.append(Dispatch(tuple(plan.work[i] for i in sampled), out, decode=bool(decodes)))
        elif decodes:
            out = self.runner.decode([slot_of[w.request_id] for w in decodes], max(w.start for w in decodes),
                                     plan.decode_steps)
            dispatched.append(Dispatch(decodes, out, decode=True))
        if prev is not None:                              # ran ahead: read it while this one computes
            self._collect([prev], outputs, released_by_scheduler=False)
        t = now if self._fixed_clock else time.monotonic()
        if self.config.dispatch_ahead and len(dispatched) == 1:
            # One step behind: charge the tokens the dispatch will produce now (one per sampled row,
            # up to decode_steps in a multi-step decode; a row stops early only on a stop id, which
            # finishes it), and read them during the next step, after its dispatch.
            d, steps = dispatched[0], (1 if plan.prefill_items else plan.decode_steps)
            predicted = {}
            for w in d.items:
                job = self.scheduler.jobs.get(w.request_id)       # None: finished at the read above
                if job is not None:
                    predicted[w.request_id] = max(1, min(steps, job.max_tokens - job.generated))
            self.scheduler.on_step_done(plan, t, generated=predicted)
            self._inflight = d
            return outputs
        self._collect(dispatched, outputs, released_by_scheduler=True, plan=plan, now=t)
        return outputs

    def _collect(self, dispatched: list[Dispatch], outputs: list[RequestOutput], released_by_scheduler: bool,
                 plan: Plan | None = None, now: float | None = None) -> None:
        """Read dispatches in order, append their tokens, end finished requests.

        ``released_by_scheduler``: the plan's ``on_step_done`` is called here with the real counts
        (and releases the finished); else it was called at dispatch time with predicted counts and
        the finished are released one by one."""
        generated: dict[str, int] = {}
        finished: list[str] = []
        progressed: list[str] = []
        for d in dispatched:
            self._read(d, generated, finished, progressed)
            if d.decode:
                self.stats_totals["decode_dispatches"] += 1
                self.stats_totals["decode_iterations"] += max(
                    (generated.get(w.request_id, 0) for w in d.items), default=0)
        if released_by_scheduler:
            self.scheduler.on_step_done(plan, now, finished=finished, generated=generated)
        else:
            for rid in finished:
                self.scheduler.finish(rid)
        for rid in progressed:
            if rid in self._requests:
                outputs.append(self._requests[rid].output())
        for rid in finished:
            del self._requests[rid]
            self.slots.release(rid)

    def _bind_slots(self, plan: Plan) -> dict[str, int]:
        """A slot for every item that samples, its row brought up to date (uploaded only if changed)."""
        keep = {w.request_id for w in plan.work if w.sample}
        self.slots.tick()
        slot_of = {}
        for w in plan.work:
            if not w.sample:
                continue
            req = self._requests[w.request_id]
            fresh = self.slots.lookup(w.request_id) is None
            s = slot_of[w.request_id] = self.slots.bind(w.request_id, keep)
            pages = self.scheduler.block_table(w.request_id)
            if not fresh:                                 # the device owns token / position / step
                self.slots.set_pages(s, pages)
                continue
            # A fresh binding is never a row whose tokens are still in flight (that row is in this
            # plan, so it kept its slot): the host's tokens are complete.
            last = w.start + w.num_tokens - 1                     # position of the row's input token
            row = SlotRow(w.request_id, req.token_at(last), last, pages,
                          SamplingRow(req.params, req.seed, len(req.out_ids), req.stop_ids))
            pen = None
            if has_penalty(req.params):
                pen = host_penalties(req.tokens, len(req.prompt_ids), self.model_config.vocab_size)
            self.slots.write(s, row, pen)
        return slot_of

    def _read(self, d: Dispatch, generated, finished, progressed) -> None:
        """Append the tokens of one dispatch to its requests (host side, after the device ran).
        Requests already gone (aborted, or finished by an earlier dispatch) are skipped."""
        out = d.out
        items = [(i, w) for i, w in enumerate(d.items) if w.request_id in self._requests]
        if not items:
            return
        want_lp = any(self._requests[w.request_id].params.logprobs is not None for _, w in items)
        fields = (out.tokens, out.num_tokens, out.finished_idx, out.num_finished)
        if want_lp:
            fields += (out.logprob, out.top_ids, out.top_logprobs)
        host = jax.device_get(fields)
        tokens, num_tokens, fin_idx, num_fin = host[:4]
        dev_done = set(fin_idx[:int(num_fin)].tolist())
        for i, w in items:
            req = self._requests[w.request_id]
            if req.finished:
                continue
            n = int(num_tokens[i])
            generated[w.request_id] = n
            toks = tokens[:n, i].tolist()
            lps = None
            if req.params.logprobs is not None:
                k = req.params.logprobs
                lps = [TokenLogprob(toks[j], float(host[4][j, i]),
                                    tuple(zip(host[5][j, i, :k].tolist(), host[6][j, i, :k].tolist())))
                       for j in range(n)]
            before = len(req.out_ids)
            if n:
                req.extend(toks, lps, i in dev_done)
                progressed.append(w.request_id)
            self.stats_totals["generation_tokens_total"] += len(req.out_ids) - before
            if req.finished:
                finished.append(w.request_id)

    # ------------------------------------------------------------------ metrics
    def stats(self) -> dict:
        s = dict(self.scheduler.stats())
        s.update(self.stats_totals)
        return s

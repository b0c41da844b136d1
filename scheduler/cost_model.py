"""Iteration-time model: seconds for one engine step as a function of its work.

    t = base + per_prefill_token * prefill_tokens + per_decode_row * decode_rows
             + per_context_token * context_tokens + per_swap_page * swapped_pages

with ``decode_base`` in place of ``base`` for a decode dispatch (no prefill tokens) when it is set:
the engine's decode program is not its step program (one token per row, no 16-token minimum). On
the 2-core CPU (benchmarks/results/cost_model_cpu_2core.json) a one-row decode took 29-39 ms; one
base for both (the previous fit) charged it 49 ms, the split fit 39-41 ms (step base 86 ms, decode
base 35 ms). A K-step decode dispatch (K = 8) measured the same per iteration as K = 1 (31 vs 39 ms
at one row, 61 vs 62 at four, 133 vs 121 at sixteen), so K iterations are charged K times.

With the engine's bucket tables (``token_buckets``: its step sizes; ``row_buckets``: its decode
batch sizes), work is charged padded up as the engine computes it: a ragged step's tokens (chunk
tokens plus decode rows) up to the step bucket, the padding charged as prefill tokens; a decode
dispatch's rows up to the batch bucket. Measured on the 2-core CPU (default model,
benchmarks/results/cost_model_cpu_2core.json, which lists every sample beside both fits): a 64-token
chunk beside 4 decode rows took 778 ms, more than a 256-token chunk alone (704 ms) and 3.3x a
64-token chunk alone (237 ms), because 68 tokens run in the 256-token program; 8 decode rows cost
about what 16 do. The padded fit puts that step at 748 ms, an unpadded single-base fit of the same
samples at 314 ms (2.5x off), and batch-16 decode at 112-135 ms against 240-243 ms (measured 91-121).

One step is one dispatch of the engine: a ragged step (prefill chunks of several requests and
the decode rows in one program) or a decode dispatch, so ``base`` is paid once per step, as in
the engine since the ragged step (before it, each prefill chunk was its own program and paid its
own fixed cost, which this model did not charge). A multi-step decode dispatch of K iterations is
charged K iterations (``Scheduler.schedule``).

Fitted by least squares from a profiling run of the real engine
(``scripts/profile_cost_model.py``; saved as JSON beside the model) or the
CPU default (``CostModel.cpu_default()``: the field defaults and a decode base; SmolLM2-135M, f32, 2 cores: benchmarks/results/cost_model_cpu_2core.json,
padded to that engine's buckets; the engine always pads by its own, ``EngineConfig.scheduler_config``). The simulator's "gpu" profile
(``GPU`` in scripts/gen_trace.py) is the fit on an H200 (benchmarks/results/gpu/). The MLFQ uses it to predict a
new job's prefill time (skip-join) and to charge service time, the simulator
to advance its clock.
"""
from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class CostModel:
    base: float = 0.086                 # s per step (weights read once, dispatch)
    decode_base: float | None = None    # s per decode dispatch iteration (None: ``base``)
    per_prefill_token: float = 0.0025   # s per prefill token
    per_decode_row: float = 0.0046      # s per decode row
    per_context_token: float = 3.2e-6   # s per cached token attended
    per_swap_page: float = 1e-4         # s per page copied device<->host
    token_buckets: tuple[int, ...] = ()  # the engine's step sizes (tokens); () = no padding
    row_buckets: tuple[int, ...] = ()    # the engine's decode batch sizes (rows); () = no padding

    @classmethod
    def cpu_default(cls) -> "CostModel":
        """The CPU fit (the field defaults) with its own decode base: what the engine and the
        simulator's "cpu" profile use when no cost-model file is given."""
        return cls(decode_base=0.035)

    def padded(self, prefill_tokens: int, decode_rows: int) -> tuple[int, int]:
        """(prefill tokens, decode rows) as the engine computes them: a step padded to its token
        bucket (the padding counted as prefill tokens), a decode dispatch to its batch bucket."""
        if prefill_tokens:
            return _pad(prefill_tokens + decode_rows, self.token_buckets) - decode_rows, decode_rows
        return 0, _pad(decode_rows, self.row_buckets)

    def iteration_time(self, prefill_tokens: int = 0, decode_rows: int = 0, context_tokens: int = 0,
                       swapped_pages: int = 0) -> float:
        if not (prefill_tokens or decode_rows or swapped_pages):
            return 0.0
        base = self.decode_base if prefill_tokens == 0 and self.decode_base is not None else self.base
        prefill_tokens, decode_rows = self.padded(prefill_tokens, decode_rows)
        return (base + self.per_prefill_token * prefill_tokens + self.per_decode_row * decode_rows
                + self.per_context_token * context_tokens + self.per_swap_page * swapped_pages)

    def token_cost(self, max_batch: int) -> float:
        """One output token's work: one decode row's share of a full-batch step (``base / max_batch +
        per_decode_row``), the unit the MLFQ and the references charge decode work in."""
        return self.base / max(1, max_batch) + self.per_decode_row

    def prefill_time(self, prompt_len: int) -> float:
        """Predicted first-iteration time of a job alone (skip-join)."""
        return self.iteration_time(prefill_tokens=prompt_len, context_tokens=prompt_len)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        d = json.loads(text)
        return cls(**{k: tuple(int(x) for x in v) if isinstance(v, list) else None if v is None else float(v)
                      for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def load(cls, path: str) -> "CostModel":
        with open(path) as f:
            return cls.from_json(f.read())

    @classmethod
    def fit(cls, samples: list[dict], token_buckets: tuple[int, ...] = (),
            row_buckets: tuple[int, ...] = (), decode_base: bool = False) -> "CostModel":
        """Least squares over samples {prefill_tokens, decode_rows, context_tokens, seconds}, the
        work padded by the given bucket tables (kept in the model). With ``decode_base`` (and both
        decode-only and prefill samples) decode dispatches get their own fixed cost."""
        import numpy as np
        pad = cls(token_buckets=tuple(token_buckets), row_buckets=tuple(row_buckets)).padded
        kinds = {s["prefill_tokens"] == 0 for s in samples}
        split = decode_base and kinds == {True, False}
        X = np.array([[1.0, *pad(s["prefill_tokens"], s["decode_rows"]), s["context_tokens"]]
                      + ([float(s["prefill_tokens"] == 0)] if split else []) for s in samples])
        y = np.array([s["seconds"] for s in samples])
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        raw_base = float(coef[0])
        decode = max(raw_base + float(coef[4]), 0.0) if split else None
        coef = np.maximum(coef, 0.0)
        return cls(base=float(coef[0]), per_prefill_token=float(coef[1]), per_decode_row=float(coef[2]),
                   per_context_token=float(coef[3]), token_buckets=tuple(token_buckets),
                   row_buckets=tuple(row_buckets), decode_base=decode)


def _pad(n: int, table: tuple[int, ...]) -> int:
    """The smallest bucket of ``table`` that holds ``n`` (``n`` itself past the largest, or without a table)."""
    return next((b for b in table if b >= n), n)

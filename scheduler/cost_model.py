"""Iteration-time model: seconds for one engine step as a function of its work.

    t = base + per_prefill_token * prefill_tokens + per_decode_row * decode_rows
             + per_context_token * context_tokens + per_swap_page * swapped_pages

One step is one dispatch of the engine: a ragged step (prefill chunks of several requests and
the decode rows in one program) or a decode dispatch, so ``base`` is paid once per step, as in
the engine since the ragged step (before it, each prefill chunk was its own program and paid its
own fixed cost, which this model did not charge). A multi-step decode dispatch of K iterations is
charged K iterations (``Scheduler.schedule``).

Fitted by least squares from a profiling run of the real engine
(``scripts/profile_cost_model.py``; saved as JSON beside the model) or the
CPU default below (SmolLM2-135M, f32, 2 cores). The simulator's "gpu" profile
(``GPU`` in scripts/gen_trace.py) is assumed, not measured. The MLFQ uses it to predict a
new job's prefill time (skip-join) and to charge service time, the simulator
to advance its clock.
"""
from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class CostModel:
    base: float = 0.030                 # s per step (weights read once, dispatch)
    per_prefill_token: float = 0.0022   # s per prefill token
    per_decode_row: float = 0.0035      # s per decode row
    per_context_token: float = 2e-6     # s per cached token attended
    per_swap_page: float = 1e-4         # s per page copied device<->host

    def iteration_time(self, prefill_tokens: int = 0, decode_rows: int = 0, context_tokens: int = 0,
                       swapped_pages: int = 0) -> float:
        if not (prefill_tokens or decode_rows or swapped_pages):
            return 0.0
        return (self.base + self.per_prefill_token * prefill_tokens + self.per_decode_row * decode_rows
                + self.per_context_token * context_tokens + self.per_swap_page * swapped_pages)

    def prefill_time(self, prompt_len: int) -> float:
        """Predicted first-iteration time of a job alone (skip-join)."""
        return self.iteration_time(prefill_tokens=prompt_len, context_tokens=prompt_len)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        d = json.loads(text)
        return cls(**{k: float(v) for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def load(cls, path: str) -> "CostModel":
        with open(path) as f:
            return cls.from_json(f.read())

    @classmethod
    def fit(cls, samples: list[dict]) -> "CostModel":
        """Least squares over samples {prefill_tokens, decode_rows, context_tokens, seconds}."""
        import numpy as np
        X = np.array([[1.0, s["prefill_tokens"], s["decode_rows"], s["context_tokens"]] for s in samples])
        y = np.array([s["seconds"] for s in samples])
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        coef = np.maximum(coef, 0.0)
        return cls(base=float(coef[0]), per_prefill_token=float(coef[1]), per_decode_row=float(coef[2]),
                   per_context_token=float(coef[3]))

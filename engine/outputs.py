"""What the engine returns for a request: text, token ids, finish reason, timings."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()     # (token_id, logprob), best first


@dataclasses.dataclass(frozen=True)
class RequestTimings:
    arrival: float                  # time.time() when the request was added
    first_token: float | None       # when the first output token was produced
    finish: float | None            # when the request ended


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """A snapshot of one request after an engine step.

    text / token_ids hold everything generated so far; delta_text /
    delta_token_ids only what this step added (for streaming).
    finish_reason: None while running, else "stop" (EOS, stop id or stop
    string), "length" (max_tokens or context full), "abort", or "error" (the engine step
    holding it failed; ``error`` says why, and the engine went on serving).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    text: str
    token_ids: tuple[int, ...]
    delta_text: str
    delta_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None
    timings: RequestTimings
    logprobs: tuple[TokenLogprob, ...] | None = None     # one per generated token, if asked
    delta_logprobs: tuple[TokenLogprob, ...] | None = None
    error: str | None = None            # why the request ended, when finish_reason is "error"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)

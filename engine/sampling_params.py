"""Per-request sampling parameters (validated on construction).

Every field becomes a per-row array in the jitted step, so changing them
never triggers a compile.
"""
from __future__ import annotations

import dataclasses
import operator

MAX_LOGPROBS = 20      # top-n logprobs computed on device for every row
MAX_STOP_IDS = 8       # stop token ids per request checked on device, the model's EOS ids included
_I32_MIN, _I32_MAX = -2**31, 2**31 - 1      # per-row ints travel to the device as int32
_F32_MAX = 3.4028234663852886e38           # ... and floats as float32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request.

    temperature=0 is greedy. top_k<=0 disables top-k; top_p=1 and min_p=0 are off.
    seed makes sampling reproducible regardless of batching, preemption or swaps.
    stop: strings that end the output (not included in the text);
    stop_token_ids: token ids that end the output (not included in the text).
    At most MAX_STOP_IDS distinct stop ids per request, counting the model's
    EOS ids unless ignore_eos: every one is honoured, and a request over the
    limit is refused with ValueError (``device_stop_ids``), never truncated.
    logprobs: None, or the number (0..20) of top alternatives returned per token
    (0 returns only the sampled token's logprob).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # Normalise list inputs so the dataclass stays hashable and frozen.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(_token_id(t) for t in (self.stop_token_ids or ())))
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_num(self.temperature) or self.temperature < 0:
            bad(f"temperature must be >= 0 and finite, got {self.temperature!r}")
        if not _is_num(self.top_p) or not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not _I32_MIN <= self.top_k <= _I32_MAX:
            bad(f"top_k must be a 32-bit integer, got {self.top_k!r}")
        if not _is_num(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not (-2.0 <= v <= 2.0):
                bad(f"{name} must be in [-2, 2], got {v!r}")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad(f"stop must be non-empty strings, got {self.stop!r}")
        if any(not 0 <= t <= _I32_MAX for t in self.stop_token_ids):
            bad(f"stop_token_ids must be token ids in [0, 2**31), got {self.stop_token_ids!r}")
        if len(set(self.stop_token_ids)) > MAX_STOP_IDS:
            bad(f"stop_token_ids has {len(set(self.stop_token_ids))} distinct ids; at most {MAX_STOP_IDS} are "
                f"supported (the model's EOS ids count towards the limit unless ignore_eos)")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def device_stop_ids(self, eos_token_ids=()) -> tuple[int, ...]:
        """Every stop id the request ends on: the EOS ids (unless ignore_eos), then stop_token_ids.

        Distinct ids in that order. More than MAX_STOP_IDS (the width of the
        device's per-row stop array) raises ValueError naming the limit: no id
        is ever silently dropped.
        """
        eos = () if self.ignore_eos else tuple(int(t) for t in eos_token_ids)
        ids = tuple(dict.fromkeys(eos + self.stop_token_ids))
        if len(ids) > MAX_STOP_IDS:
            n_eos = len(set(eos))
            raise ValueError(
                f"stop_token_ids plus the model's {n_eos} EOS id(s) make {len(ids)} distinct stop ids; at most "
                f"{MAX_STOP_IDS} per request are supported (EOS ids count unless ignore_eos)")
        return ids


def _token_id(t) -> int:
    if isinstance(t, bool) or not hasattr(t, "__index__"):
        raise ValueError(f"stop_token_ids must be integers, got {t!r}")
    return operator.index(t)


def _is_num(v) -> bool:
    """A real number the device can hold as float32: not bool, not NaN, not infinite or beyond float32."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) <= _F32_MAX

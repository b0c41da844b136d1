"""The engine's view of one request: tokens, detokenized text, stop handling, timings."""
from __future__ import annotations

import dataclasses
import time

from ferry.engine.outputs import RequestOutput, RequestTimings, TokenLogprob
from ferry.engine.sampling_params import SamplingParams


@dataclasses.dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int                              # params.seed, or one drawn at add time
    stop_ids: tuple[int, ...]              # checked on device (EOS unless ignore_eos, + stop_token_ids)
    detok: object                          # models.detokenizer.IncrementalDetokenizer
    priority: int = 0
    arrival: float = dataclasses.field(default_factory=time.time)
    out_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    text: str = ""                         # full decoded output (stop string cut off when hit)
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    _sent_text: int = 0                    # chars already returned as deltas
    _sent_ids: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.out_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: TokenLogprob | None, device_done: bool) -> None:
        """Add one sampled token, then decide whether the request is finished."""
        now = time.time()
        if self.first_token_time is None:
            self.first_token_time = now
        self.out_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if token in self.stop_ids:
            self.finish("stop", now)
            return
        self.text += self.detok.add(token)
        if self.params.stop:
            self._check_stop_strings()
            if self.finished:
                return
        if device_done or len(self.out_ids) >= self.params.max_tokens:
            self.finish("length", now)

    def _check_stop_strings(self) -> None:
        hits = [i for i in (self.text.find(s) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish("stop")

    def finish(self, reason: str, now: float | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.finish_time = now or time.time()
            if reason != "stop" or not self.params.stop:
                self.text += self.detok.flush()

    def output(self) -> RequestOutput:
        """Snapshot with the deltas since the previous snapshot.

        While running, text that could still become a stop string is held back,
        so the streamed deltas always concatenate to the final text.
        """
        hold = 0
        if self.params.stop and not self.finished:
            hold = max(len(s) for s in self.params.stop) - 1
        visible = len(self.text) - hold
        delta_text = self.text[self._sent_text:visible] if visible > self._sent_text else ""
        self._sent_text = max(self._sent_text, visible)
        delta_ids = tuple(self.out_ids[self._sent_ids:])
        delta_lp = tuple(self.logprobs[self._sent_ids:]) if self.params.logprobs is not None else None
        self._sent_ids = len(self.out_ids)
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=tuple(self.prompt_ids),
            text=self.text if self.finished else self.text[:max(visible, 0)],
            token_ids=tuple(self.out_ids), delta_text=delta_text, delta_token_ids=delta_ids,
            finished=self.finished, finish_reason=self.finish_reason,
            timings=RequestTimings(self.arrival, self.first_token_time, self.finish_time),
            logprobs=tuple(self.logprobs) if self.params.logprobs is not None else None,
            delta_logprobs=delta_lp)

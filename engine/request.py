"""The engine's view of one request: tokens, detokenized text, stop handling, timings."""
from __future__ import annotations

import dataclasses
import time

from ferry.engine.outputs import RequestOutput, RequestTimings, TokenLogprob
from ferry.engine.sampling_params import MAX_STOP_IDS, SamplingParams


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
    error: str | None = None               # message of an "error" finish
    _sent_text: int = 0                    # chars already returned as deltas
    _sent_ids: int = 0
    _stop_hold: int = dataclasses.field(default=0, init=False, repr=False)  # max(len(stop)) - 1

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.out_ids

    def token_at(self, i: int) -> int:
        """The token at position ``i`` (prompt, then output) without building ``tokens``."""
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.out_ids[i - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.out_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __post_init__(self) -> None:
        if len(self.stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"{len(self.stop_ids)} stop ids exceed the device limit MAX_STOP_IDS={MAX_STOP_IDS}")
        self._stop_hold = max((len(s) for s in self.params.stop), default=1) - 1

    def append(self, token: int, logprob: TokenLogprob | None, device_done: bool) -> None:
        """Add one sampled token, then decide whether the request is finished.

        Finishes with "stop" on any of ``stop_ids`` (all of them are checked
        here, not only on device) or on a stop string in the text; with
        "length" at max_tokens or when the device says the row is done.
        """
        now = time.time()
        if self.first_token_time is None:
            self.first_token_time = now
        self.out_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if token in self.stop_ids:
            self.finish("stop", now)
            return
        self._add_text(self.detok.add(token), now)
        if self.finished:
            return
        if device_done or len(self.out_ids) >= self.params.max_tokens:
            self.finish("length", now)

    def extend(self, tokens: list[int], logprobs: list[TokenLogprob] | None, device_done: bool) -> None:
        """Add the tokens one multi-step dispatch produced for this request, with the same result as
        ``append`` for each in turn: tokens after a stop id or past max_tokens are dropped. Requests
        with stop strings go token by token (a stop string must cut the token ids where it ends);
        the others detokenize the batch once."""
        if self.params.stop:
            for j, tok in enumerate(tokens):
                self.append(tok, logprobs[j] if logprobs else None, device_done and j == len(tokens) - 1)
                if self.finished:
                    return
            return
        now = time.time()
        if self.first_token_time is None:
            self.first_token_time = now
        stop_at = next((j for j, t in enumerate(tokens) if t in self.stop_ids), None)
        room = self.params.max_tokens - len(self.out_ids)
        take = min(len(tokens), room, len(tokens) if stop_at is None else stop_at + 1)
        self.out_ids.extend(tokens[:take])
        if logprobs:
            self.logprobs.extend(logprobs[:take])
        hit = stop_at is not None and stop_at < take
        self._add_text(self.detok.add_many(tokens[:take - 1] if hit else tokens[:take]), now)
        if hit:
            self.finish("stop", now)
        elif (device_done and take == len(tokens)) or len(self.out_ids) >= self.params.max_tokens:
            self.finish("length", now)

    def _add_text(self, new: str, now: float | None = None) -> None:
        """Append decoded text; on a stop string, cut the text there and finish with "stop".

        Only the new text plus the ``max(len(stop)) - 1`` characters before it
        are scanned (earlier text was already checked), so the work per call is
        linear in the new text, not in the whole output.
        """
        if not new:
            return
        start = len(self.text)
        self.text += new
        if not self.params.stop:
            return
        cut = find_stop_string(self.text, self.params.stop, max(0, start - self._stop_hold))
        if cut is not None:
            self.text = self.text[:cut]
            if self.finish_reason in (None, "length"):   # a "length" finish whose final flush hits one
                self.finish_reason = "stop"
            self.finish_time = self.finish_time or now or time.time()

    def finish(self, reason: str, now: float | None = None) -> None:
        """End the request (first reason wins) and emit the detokenizer's held-back text.

        That final text is checked against the stop strings like any other: a
        hit cuts it there and the finish reason becomes "stop".
        """
        if self.finish_reason is None:
            self.finish_reason = reason
            self.finish_time = now or time.time()
            self._add_text(self.detok.flush(), self.finish_time)

    def output(self) -> RequestOutput:
        """Snapshot with the deltas since the previous snapshot.

        While running, text that could still become a stop string is held back,
        so the streamed deltas always concatenate to the final text.
        """
        hold = self._stop_hold if not self.finished else 0
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
            delta_logprobs=delta_lp, error=self.error)


def find_stop_string(text: str, stops, start: int = 0) -> int | None:
    """Index of the earliest stop string in ``text`` that starts at or after ``start``, or None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None

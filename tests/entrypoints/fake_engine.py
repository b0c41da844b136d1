"""A deterministic stand-in for ``LLMEngine`` to test AsyncEngine and the server fast.

Same public surface as ``ferry.engine.llm_engine.LLMEngine``: ``add_request``,
``abort_request``, ``step``, ``has_unfinished_requests``, ``stats`` and the
attributes ``tokenizer`` (byte tokenizer), ``model_name``, ``max_model_len``.

Behaviour, chosen so tests can predict every output:

* Token k of a request is a lowercase letter picked by ``_token(seed, prompt, k)``;
  the same seed and prompt always give the same text, whatever the batching.
* Without ``ignore_eos``, a request whose prompt contains "eos" ends with EOS
  after 3 tokens (finish_reason "stop"); stop strings end it too.
* KV pages: a request holds ceil(tokens / page_size) device pages while
  running; at most ``max_batch`` run, the rest wait (queue = priority, clamped).
* ``fail_steps = k`` makes the next k ``step()`` calls raise RuntimeError.
* ``threads`` records every thread that called into the engine: AsyncEngine
  must keep it at one.
"""
from __future__ import annotations

import hashlib
import math
import threading
import time

from ferry.engine.outputs import RequestOutput, RequestTimings, TokenLogprob
from ferry.engine.sampling_params import SamplingParams
from ferry.models.random_weights import ByteTokenizer

EOS = 2
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _token(seed: int, prompt_ids: tuple[int, ...], k: int) -> int:
    """The k-th output token (a lowercase letter's byte id) of a request."""
    h = hashlib.blake2b(f"{seed}|{prompt_ids}|{k}".encode(), digest_size=4).digest()
    return ord(LETTERS[int.from_bytes(h, "little") % len(LETTERS)]) + 3


class _Req:
    def __init__(self, rid, text, ids, params, seed, priority):
        self.rid, self.text, self.ids, self.params, self.seed = rid, text, tuple(ids), params, seed
        self.priority = priority
        self.out: list[int] = []
        self.lps: list[TokenLogprob] = []
        self.out_text = ""
        self.sent_tokens = 0          # tokens already reported in a delta
        self.sent_text = 0
        self.arrival = time.time()
        self.first_token: float | None = None
        self.finish_reason: str | None = None

    def output(self, tokenizer, finished: bool) -> RequestOutput:
        delta_ids = tuple(self.out[self.sent_tokens:])
        delta_lps = tuple(self.lps[self.sent_tokens:]) if self.params.logprobs is not None else None
        delta_text = self.out_text[self.sent_text:]
        self.sent_tokens, self.sent_text = len(self.out), len(self.out_text)
        return RequestOutput(
            request_id=self.rid, prompt=self.text, prompt_token_ids=self.ids, text=self.out_text,
            token_ids=tuple(self.out), delta_text=delta_text, delta_token_ids=delta_ids, finished=finished,
            finish_reason=self.finish_reason if finished else None,
            timings=RequestTimings(self.arrival, self.first_token, time.time() if finished else None),
            logprobs=tuple(self.lps) if self.params.logprobs is not None else None, delta_logprobs=delta_lps)


class FakeEngine:
    """Deterministic fake engine (see module docstring)."""

    def __init__(self, max_model_len: int = 128, max_batch: int = 4, page_size: int = 4, num_pages: int = 64,
                 num_queues: int = 4, step_delay: float = 0.002, vocab_size: int = 300):
        self.tokenizer = ByteTokenizer(vocab_size)
        self.model_name = "fake"
        self.max_model_len = max_model_len
        self.max_batch, self.page_size, self.num_pages = max_batch, page_size, num_pages
        self.num_queues = num_queues
        self.step_delay = step_delay
        self.vocab_size = vocab_size
        self.fail_steps = 0
        self.threads: set[int] = set()
        self.length_hints: dict[str, int | None] = {}
        self.steps = 0
        self.aborted: list[str] = []
        self._requests: dict[str, _Req] = {}      # insertion order = FCFS
        self._running: list[str] = []
        self._pending_final: list[RequestOutput] = []
        self._totals = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "preemptions": 0,
                        "demotions": 0, "promotions": 0}

    def _touch(self) -> None:
        self.threads.add(threading.get_ident())

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None, priority: int = 0,
                    length_hint: int | None = None) -> None:
        self._touch()
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            text, ids = None, list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context length max_model_len={self.max_model_len}")
        seed = params.seed if params.seed is not None else len(self._requests) + self.steps
        self._requests[request_id] = _Req(request_id, text, ids, params, seed, priority)
        self.length_hints[request_id] = length_hint      # what the server passed (tests read it)
        self._totals["prompt_tokens_total"] += len(ids)

    def abort_request(self, request_id: str) -> None:
        self._touch()
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        if request_id in self._running:
            self._running.remove(request_id)
        self.aborted.append(request_id)
        req.finish_reason = "abort"
        self._pending_final.append(req.output(self.tokenizer, finished=True))

    def has_unfinished_requests(self) -> bool:
        self._touch()
        return bool(self._requests) or bool(self._pending_final)

    def _pages(self, req: _Req) -> int:
        return math.ceil((len(req.ids) + len(req.out)) / self.page_size)

    def _pages_used(self) -> int:
        return sum(self._pages(self._requests[r]) for r in self._running)

    def step(self) -> list[RequestOutput]:
        self._touch()
        self.steps += 1
        if self.fail_steps > 0:
            self.fail_steps -= 1
            raise RuntimeError("injected step failure")
        if self.step_delay:
            time.sleep(self.step_delay)
        outputs, self._pending_final = self._pending_final, []
        for rid, req in self._requests.items():        # admit FCFS while slots and pages allow
            if len(self._running) >= self.max_batch:
                break
            if rid not in self._running and self._pages_used() + self._pages(req) + 1 <= self.num_pages:
                self._running.append(rid)
        for rid in list(self._running):
            req = self._requests[rid]
            outputs.append(self._advance(req))
            if req.finish_reason is not None:
                self._running.remove(rid)
                del self._requests[rid]
        return outputs

    def _advance(self, req: _Req) -> RequestOutput:
        p = req.params
        k = len(req.out)
        if not p.ignore_eos and "eos" in (req.text or "") and k == 3:
            tok = EOS
        else:
            tok = _token(req.seed, req.ids, k)
        if req.first_token is None:
            req.first_token = time.time()
        req.out.append(tok)
        self._totals["generation_tokens_total"] += 1
        if p.logprobs is not None:
            top = tuple((_token(req.seed + j + 1, req.ids, k), -1.0 - j) for j in range(p.logprobs))
            req.lps.append(TokenLogprob(tok, -0.5, top))
        if tok == EOS or tok in p.stop_token_ids:
            req.finish_reason = "stop"
        else:
            req.out_text += self.tokenizer.decode([tok])
            for s in p.stop:
                cut = req.out_text.find(s)
                if cut >= 0:
                    req.out_text = req.out_text[:cut]
                    req.sent_text = min(req.sent_text, cut)
                    req.finish_reason = "stop"
                    break
        if req.finish_reason is None and (len(req.out) >= p.max_tokens
                                          or len(req.ids) + len(req.out) >= self.max_model_len):
            req.finish_reason = "length"
        return req.output(self.tokenizer, finished=req.finish_reason is not None)

    def stats(self) -> dict:
        self._touch()
        s = {f"waiting_q{q}": 0 for q in range(self.num_queues)}
        for rid, req in self._requests.items():
            if rid not in self._running:
                s[f"waiting_q{min(max(req.priority, 0), self.num_queues - 1)}"] += 1
        s.update(running=len(self._running), swapped=0, waiting=sum(s.values()),
                 device_pages_used=self._pages_used(), device_pages_total=self.num_pages,
                 host_pages_used=0, host_pages_total=self.num_pages, **self._totals)
        return s

"""Python API: ``from ferry import LLM, SamplingParams``.

>>> llm = LLM()                                   # default SmolLM2-135M-Instruct, offline
>>> out = llm.generate("What is the capital of France?", SamplingParams(temperature=0, max_tokens=32))
>>> out[0].text
"""
from __future__ import annotations

import itertools
import time
from typing import Iterable, Iterator, Sequence

from ferry.engine.config import EngineConfig
from ferry.engine.entrypoints.args import canonical_kwargs
from ferry.engine.llm_engine import LLMEngine
from ferry.engine.outputs import RequestOutput
from ferry.engine.sampling_params import SamplingParams

Prompt = str | list[int]
Messages = list[dict]


class LLM:
    """Offline / in-process generation with continuous batching.

    Args mirror ``EngineConfig``: ``model`` (None = default SmolLM2 GGUF, a
    .gguf file, HF directory, Ferry Orbax directory, or ``random:<shape>``),
    ``max_batch``, ``max_model_len``, ``scheduler`` ("mlfq" | "fcfs"),
    ``dtype``, ``num_pages``, ``tensor_parallel``, ... vLLM's names for the same
    settings work too (``tensor_parallel_size``, ``max_num_seqs``,
    ``gpu_memory_utilization``, ``swap_space``, ``block_size``, ...): they are the
    ``flags`` of EngineConfig's fields, mapped in ``args.canonical_kwargs``.

    Multi-host (``num_processes > 1``, ``coordinator_address``, ``process_id``):
    run the same script on every process. Process 0's calls do the work; on the
    other processes ``generate``/``chat`` mirror process 0's steps and return
    the same outputs (see engine/distributed.py).
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **kwargs) -> None:
        if config is not None and (model is not None or kwargs):
            raise ValueError("pass either config=EngineConfig(...) or keyword settings, not both")
        config = config or EngineConfig(model=model, **canonical_kwargs(EngineConfig, kwargs))
        self.multihost = config.num_processes > 1
        if self.multihost:
            from ferry.engine.distributed import MultiHostEngine, initialize
            initialize(config.coordinator_address, config.num_processes, config.process_id)
            self.engine = MultiHostEngine(config)
        else:
            self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        """Wrap an existing single-process engine (e.g. one built with a preloaded bundle)."""
        obj = cls.__new__(cls)
        obj.engine, obj.tokenizer, obj.multihost = engine, engine.tokenizer, False
        obj._ids = itertools.count()
        return obj

    def _next_id(self) -> str:
        return f"llm-{next(self._ids)}"

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 priority: Sequence[int] | None = None,
                 length_hints: Sequence[int | None] | None = None) -> list[RequestOutput]:
        """Generate for one prompt or many (strings or token-id lists); returns outputs in order.

        ``params`` is one SamplingParams for all prompts or one per prompt. ``priority`` (higher runs
        first) and ``length_hints`` (predicted output tokens, None for none) are one per prompt:
        ``LLMEngine.add_request``'s. All prompts are validated before any runs (a bad one raises
        ValueError and nothing runs).
        """
        if self.multihost and not self.engine.is_leader:
            return self._run([])
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        prios = [0] * len(prompts) if priority is None else list(priority)
        hints = [None] * len(prompts) if length_hints is None else list(length_hints)
        for name, given in (("SamplingParams", plist), ("priorities", prios), ("length hints", hints)):
            if len(given) != len(prompts):
                raise ValueError(f"got {len(given)} {name} for {len(prompts)} prompts")
        ids = [self._next_id() for _ in prompts]
        added = []
        try:
            for rid, p, sp, prio, hint in zip(ids, prompts, plist, prios, hints):
                self.engine.add_request(rid, p, sp, priority=prio, length_hint=hint)
                added.append(rid)
        except Exception:
            for rid in added:
                self.engine.abort_request(rid)
            self._drain()
            raise
        return self._run(ids)

    def chat(self, messages: Messages | Sequence[Messages], params: SamplingParams | None = None, *,
             priority: Sequence[int] | None = None, length_hints: Sequence[int | None] | None = None
             ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or many) and generate (``priority`` and
        ``length_hints``: ``generate``'s, one per conversation)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        # ids as transformers' apply_chat_template(tokenize=True): BOS only where the template renders it
        prompts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m in convs]
        return self.generate(prompts, params, priority=priority, length_hints=length_hints)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield incremental text for one prompt as it is generated."""
        rid = self._next_id()
        self.engine.add_request(rid, prompt, params or SamplingParams())
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        if out.delta_text:
                            yield out.delta_text
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)
            self._drain()

    def replay(self, jobs: Iterable[dict]) -> list[dict]:
        """Replay a trace in real time: each job ``{"arrival", "prompt_len", "output_len"}``
        (optional ``"prompt"`` and ``"length_hint"``) is submitted at its arrival offset with ignore_eos and
        max_tokens=output_len. Returns per job: arrival, first_token, finish (seconds
        from the start) and num_output_tokens."""
        jobs = sorted(jobs, key=lambda j: j["arrival"])
        t0, nxt, ids = time.monotonic(), 0, {}
        res: dict[str, dict] = {}
        vocab = self.engine.model_config.vocab_size
        while nxt < len(jobs) or self.engine.has_unfinished_requests():
            now = time.monotonic() - t0
            while nxt < len(jobs) and jobs[nxt]["arrival"] <= now:
                j = jobs[nxt]
                prompt = j.get("prompt") or [(7 * i + nxt) % (vocab - 1) + 1 for i in range(int(j["prompt_len"]))]
                rid = f"job-{nxt}"
                self.engine.add_request(rid, prompt, SamplingParams(
                    max_tokens=int(j["output_len"]), temperature=0.0, ignore_eos=True),
                    length_hint=None if j.get("length_hint") is None else int(j["length_hint"]))
                ids[rid] = nxt
                res[rid] = {"arrival": j["arrival"], "first_token": None, "finish": None, "num_output_tokens": 0}
                nxt += 1
            if not self.engine.has_unfinished_requests():
                time.sleep(max(0.0, min(jobs[nxt]["arrival"] - now, 0.05)))
                continue
            for out in self.engine.step():
                r = res[out.request_id]
                t = time.monotonic() - t0
                if r["first_token"] is None and out.token_ids:
                    r["first_token"] = t
                r["num_output_tokens"] = len(out.token_ids)
                if out.finished:
                    r["finish"] = t
        return [res[f"job-{i}"] for i in range(len(jobs))]

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        if self.multihost and not self.engine.is_leader:
            done = [o for o in self.engine.follow(until_release=True) if o.finished]
            return sorted(done, key=lambda o: int(o.request_id.rsplit("-", 1)[1]))
        want, final = set(ids), {}
        while want - final.keys():
            for out in self.engine.step():
                if out.finished and out.request_id in want:
                    final[out.request_id] = out
        if self.multihost:
            self.engine.release()
        return [final[i] for i in ids]

    def close(self) -> None:
        """Multi-host: process 0 releases the others; they wait here for it (call on every process)."""
        if self.multihost:
            if self.engine.is_leader:
                self.engine.stop()
            else:
                self.engine.follow()

    def _drain(self) -> None:
        while self.engine._pending_final:
            self.engine.step()

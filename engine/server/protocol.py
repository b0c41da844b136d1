"""OpenAI-compatible request models and response builders.

Requests are pydantic models (type errors become HTTP 400); value ranges are
checked by ``SamplingParams`` when a request is turned into sampling
parameters. Responses are plain dicts built by the functions below, shaped
exactly like OpenAI's ``/v1/completions`` and ``/v1/chat/completions``.
"""
from __future__ import annotations

import time
from typing import Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ferry.engine.outputs import RequestOutput, TokenLogprob
from ferry.engine.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_N = 64
SEED_MOD = 2 ** 63

Prompt = Union[str, list[str], list[int], list[list[int]]]


def _valid_unicode(value):
    """Strings anywhere in a field must encode as UTF-8: JSON can carry unpaired surrogates
    (``"\\ud800"``), which would otherwise fail later, in the tokenizer or in the response."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("contains an unpaired UTF-16 surrogate (not valid Unicode)") from None
    elif isinstance(value, (list, tuple)):
        for v in value:
            if not isinstance(v, int):
                _valid_unicode(v)
    elif isinstance(value, BaseModel):
        for v in value.__dict__.values():
            _valid_unicode(v)
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    include_usage: Optional[bool] = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions (OpenAI names + extras)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = Field(default=1, ge=1, le=MAX_N)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(default=None, ge=-SEED_MOD, lt=SEED_MOD)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # extras (vLLM-style)
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: Optional[bool] = False
    stop_token_ids: Optional[list[int]] = None
    priority: Optional[int] = 0
    length_hint: Optional[int] = Field(default=None, ge=1)   # predicted output tokens (Ferry extension)

    @field_validator("*")
    @classmethod
    def _strings_are_unicode(cls, value):
        return _valid_unicode(value)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, logprobs: int | None, index: int) -> SamplingParams:
        """SamplingParams for sample ``index`` (0..n-1); raises ValueError on bad values."""
        seed = self.seed
        if seed is not None and index:
            seed = (seed + index) % SEED_MOD
        stop = self.stop
        if isinstance(stop, str):
            stop = [stop]
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=tuple(stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
        )


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``."""

    prompt: Prompt
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Optional[bool] = False

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (strings or token id lists)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    def as_template_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def num_logprobs(self) -> int | None:
        """Engine-side logprobs count, or None; ValueError if top_logprobs lacks logprobs."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return (self.top_logprobs or 0) if self.logprobs else None


# -- responses ----------------------------------------------------------------------

def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    """OpenAI error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(lps: tuple[TokenLogprob, ...], decode: Callable[[int], str],
                        text_offset: int = 0) -> dict:
    """Legacy completions ``logprobs`` object for the given tokens."""
    tokens, offsets, top = [], [], []
    offset = text_offset
    for lp in lps:
        tok = decode(lp.token_id)
        tokens.append(tok)
        offsets.append(offset)
        offset += len(tok)
        top.append({decode(t): v for t, v in lp.top} if lp.top else None)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(lps: tuple[TokenLogprob, ...], decode: Callable[[int], str]) -> dict:
    """Chat ``logprobs`` object: ``{"content": [...]}``."""
    def entry(token_id: int, logprob: float) -> dict:
        tok = decode(token_id)
        return {"token": tok, "logprob": logprob, "bytes": list(tok.encode("utf-8"))}

    content = []
    for lp in lps:
        item = entry(lp.token_id, lp.logprob)
        item["top_logprobs"] = [entry(t, v) for t, v in lp.top]
        content.append(item)
    return {"content": content}


def completion_response(rid: str, model: str, created: int, choices: list[dict], usage_: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def completion_choice(index: int, out: RequestOutput, decode, want_logprobs: bool, echo_text: str = "") -> dict:
    lps = None
    if want_logprobs and out.logprobs is not None:
        lps = completion_logprobs(out.logprobs, decode, len(echo_text))
    return {"index": index, "text": echo_text + out.text, "logprobs": lps,
            "finish_reason": out.finish_reason}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str,
                     logprobs: dict | None, finish_reason: str | None, with_usage: bool) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def chat_response(rid: str, model: str, created: int, choices: list[dict], usage_: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def chat_choice(index: int, out: RequestOutput, decode, want_logprobs: bool) -> dict:
    lps = chat_logprobs(out.logprobs, decode) if want_logprobs and out.logprobs is not None else None
    return {"index": index, "message": {"role": "assistant", "content": out.text},
            "logprobs": lps, "finish_reason": out.finish_reason}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict,
               logprobs: dict | None, finish_reason: str | None, with_usage: bool) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                          "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, model: str, created: int, object_: str, usage_: dict) -> dict:
    return {"id": rid, "object": object_, "created": created, "model": model, "choices": [],
            "usage": usage_}


def models_response(model: str, created: int | None = None) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model",
                                        "created": created or int(time.time()), "owned_by": "ferry"}]}

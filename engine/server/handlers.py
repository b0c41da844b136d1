"""Request handling behind the OpenAI routes: validated request -> engine requests -> JSON / SSE.

``_Handler`` admits one engine request per choice (``n``), merges their
output streams, renders OpenAI responses or server-sent events, aborts
everything when the client disconnects, and turns engine errors into
``APIError`` (OpenAI error JSON, never a stack trace).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from ferry.engine.server import protocol
from ferry.engine.entrypoints.async_engine import AsyncEngine, EngineClosed, EngineOverloaded, EngineStepError, RequestStream
from ferry.engine.outputs import RequestOutput
from ferry.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16
_SAMPLING_FIELDS = {f for f in SamplingParams.__dataclass_fields__} | {"top_logprobs"}
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

class APIError(Exception):
    """An error with an HTTP status, rendered as OpenAI error JSON."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(protocol.error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status, headers=self.headers)


def _value_error(exc: ValueError, default_param: str | None = None) -> APIError:
    message = str(exc) or "invalid request"
    first = message.split(" ", 1)[0]
    param = first if first in _SAMPLING_FIELDS else default_param
    return APIError(400, message, param=param)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


_SSE_DONE = "data: [DONE]\n\n"


class _Admitted:
    """The engine requests behind one HTTP request: (choice index, stream) pairs."""

    def __init__(self):
        self.streams: list[tuple[int, RequestStream]] = []

    def abort_all(self) -> None:
        for _, stream in self.streams:
            stream.abort()


class _Handler:
    """Turns validated OpenAI requests into engine requests and responses."""

    def __init__(self, engine: AsyncEngine, served: str):
        self.engine = engine
        self.served = served

    def _decode_one(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.served:
            raise APIError(404, f"The model `{model}` does not exist.", "not_found_error",
                           param="model", code="model_not_found")

    # -- /v1/completions ---------------------------------------------------------
    async def completions(self, body: protocol.CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        prompts = body.prompts()
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        n = body.n or 1
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        params = self._params(body, max_tokens, body.logprobs, n)
        rid = f"cmpl-{uuid.uuid4().hex}"
        jobs = [(p * n + k, prompt, params[k]) for p, prompt in enumerate(prompts) for k in range(n)]
        admitted = await self._admit(rid, jobs, body.priority or 0, "prompt", body.length_hint)
        echo = {}
        if body.echo:
            echo = {p * n + k: (prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(prompt))
                    for p, prompt in enumerate(prompts) for k in range(n)}
        created = int(time.time())
        want_lps = body.logprobs is not None
        if body.stream:
            events = self._completion_events(rid, created, admitted, n, want_lps, body.include_usage, echo)
            return self._sse_response(events, admitted)
        outs = await self._collect(request, admitted)
        choices = [protocol.completion_choice(i, out, self._decode_one, want_lps, echo.get(i, ""))
                   for i, out in sorted(outs.items())]
        return JSONResponse(protocol.completion_response(rid, self.served, created, choices, _usage(outs, n)))

    async def _completion_events(self, rid, created, admitted, n, want_lps, include_usage, echo) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        offsets = {i: len(echo.get(i, "")) for i, _ in admitted.streams}
        for i, text in sorted(echo.items()):
            yield _sse(protocol.completion_chunk(rid, self.served, created, i, text, None, None, include_usage))
        async for i, out in _merge(admitted):
            lps = None
            if want_lps and out.delta_logprobs:
                lps = protocol.completion_logprobs(out.delta_logprobs, self._decode_one, offsets[i])
            offsets[i] += len(out.delta_text)
            if out.delta_text or lps or out.finished:
                yield _sse(protocol.completion_chunk(rid, self.served, created, i, out.delta_text, lps,
                                                     out.finish_reason, include_usage))
            if out.finished:
                finals[i] = out
        if include_usage:
            yield _sse(protocol.usage_chunk(rid, self.served, created, "text_completion", _usage(finals, n)))

    # -- /v1/chat/completions -------------------------------------------------------
    async def chat(self, body: protocol.ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        try:
            num_logprobs = body.num_logprobs()
        except ValueError as exc:
            raise APIError(400, str(exc), param="top_logprobs") from None
        prompt_ids = self._render_chat(body)
        n = body.n or 1
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = self.engine.max_model_len - len(prompt_ids)
            if max_tokens < 1:
                raise APIError(400, f"the prompt ({len(prompt_ids)} tokens) fills the context length "
                                    f"({self.engine.max_model_len} tokens)", param="messages",
                               code="context_length_exceeded")
        params = self._params(body, max_tokens, num_logprobs, n)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        admitted = await self._admit(rid, [(k, prompt_ids, params[k]) for k in range(n)],
                                     body.priority or 0, "messages", body.length_hint)
        created = int(time.time())
        want_lps = num_logprobs is not None
        if body.stream:
            events = self._chat_events(rid, created, admitted, n, want_lps, body.include_usage)
            return self._sse_response(events, admitted)
        outs = await self._collect(request, admitted)
        choices = [protocol.chat_choice(i, out, self._decode_one, want_lps) for i, out in sorted(outs.items())]
        return JSONResponse(protocol.chat_response(rid, self.served, created, choices, _usage(outs, n)))

    def _render_chat(self, body: protocol.ChatCompletionRequest) -> list[int]:
        messages = [m.as_template_dict() for m in body.messages]
        try:
            text = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as exc:
            if isinstance(exc, ValueError) or type(exc).__name__ in ("TemplateError", "TemplateSyntaxError"):
                raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
            raise
        # As transformers' apply_chat_template(tokenize=True): the template decides on BOS.
        return list(self.engine.tokenizer.encode(text, add_special_tokens=False))

    async def _chat_events(self, rid, created, admitted, n, want_lps, include_usage) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        for i, _ in admitted.streams:
            yield _sse(protocol.chat_chunk(rid, self.served, created, i, {"role": "assistant", "content": ""},
                                           None, None, include_usage))
        async for i, out in _merge(admitted):
            lps = None
            if want_lps and out.delta_logprobs:
                lps = protocol.chat_logprobs(out.delta_logprobs, self._decode_one)
            if out.delta_text or lps:
                yield _sse(protocol.chat_chunk(rid, self.served, created, i, {"content": out.delta_text},
                                               lps, None, include_usage))
            if out.finished:
                finals[i] = out
                yield _sse(protocol.chat_chunk(rid, self.served, created, i, {}, None, out.finish_reason,
                                               include_usage))
        if include_usage:
            yield _sse(protocol.usage_chunk(rid, self.served, created, "chat.completion.chunk", _usage(finals, n)))

    # -- shared ------------------------------------------------------------------------
    def _params(self, body, max_tokens: int, logprobs: int | None, n: int) -> list[SamplingParams]:
        if body.seed is None and n > 1:
            # Independent samples need distinct seeds; draw one base per HTTP request.
            body = body.model_copy(update={"seed": uuid.uuid4().int % protocol.SEED_MOD})
        try:
            return [body.sampling_params(max_tokens, logprobs, k) for k in range(n)]
        except ValueError as exc:
            raise _value_error(exc) from None

    async def _admit(self, rid: str, jobs, priority: int, prompt_param: str,
                     length_hint: int | None = None) -> _Admitted:
        admitted = _Admitted()
        try:
            for index, prompt, params in jobs:
                stream = await self.engine.add_request(prompt, params, f"{rid}-{index}", priority, length_hint)
                admitted.streams.append((index, stream))
        except ValueError as exc:
            admitted.abort_all()
            raise _value_error(exc, prompt_param) from None
        except EngineOverloaded as exc:
            admitted.abort_all()
            raise APIError(503, str(exc), "server_error", code="overloaded",
                           headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))}) from None
        except EngineClosed:
            admitted.abort_all()
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down") from None
        except BaseException:
            admitted.abort_all()
            raise
        return admitted

    async def _collect(self, request: Request, admitted: _Admitted) -> dict[int, RequestOutput]:
        """Final outputs by choice index; aborts everything if the client disconnects."""
        async def gather() -> dict[int, RequestOutput]:
            finals: dict[int, RequestOutput] = {}
            async for i, out in _merge(admitted):
                if out.finished:
                    finals[i] = out
            return finals

        work = asyncio.ensure_future(gather())
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise APIError(499, "client disconnected")
            return work.result()
        except EngineStepError:
            raise APIError(500, "the engine failed while generating; please retry", "server_error",
                           code="engine_error") from None
        finally:
            watch.cancel()
            work.cancel()
            admitted.abort_all()

    def _sse_response(self, events: AsyncIterator[str], admitted: _Admitted) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            except EngineStepError:
                yield _sse(protocol.error_body("the engine failed while generating; please retry",
                                               "server_error", code="engine_error"))
            except Exception:
                logger.exception("error while streaming a response")
                yield _sse(protocol.error_body("internal server error", "server_error"))
            finally:
                admitted.abort_all()
            yield _SSE_DONE

        return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS,
                                 background=BackgroundTask(admitted.abort_all))


async def _merge(admitted: _Admitted) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the outputs of several request streams as (index, output)."""
    if len(admitted.streams) == 1:
        index, stream = admitted.streams[0]
        async for out in stream:
            yield index, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in admitted.streams]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        admitted.abort_all()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _usage(finals: dict[int, RequestOutput], n: int) -> dict:
    prompt = sum(out.num_prompt_tokens for i, out in finals.items() if i % n == 0)
    completion = sum(out.num_output_tokens for out in finals.values())
    return protocol.usage(prompt, completion)

"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over an ``AsyncEngine``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
SSE streaming), ``GET /v1/models``, ``GET /health``, ``GET /metrics``.
Errors use OpenAI's JSON shape; no stack trace ever reaches a client.
``ferry serve`` calls ``add_serve_arguments`` and ``run_server``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from typing import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import protocol
from engine.async_engine import AsyncEngine, EngineClosed, EngineOverloaded, EngineStepError, RequestStream
from engine.metrics import render_prometheus
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

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


def build_app(async_engine: AsyncEngine, model_name: str | None = None,
              shutdown_engine_on_exit: bool = True, shutdown_timeout: float = 30.0) -> FastAPI:
    """The FastAPI application serving ``async_engine`` under the name ``model_name``."""
    served = model_name or async_engine.model_name

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if shutdown_engine_on_exit:
            await async_engine.shutdown_async(shutdown_timeout)

    app = FastAPI(title="Ferry", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    handler = _Handler(async_engine, served)
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_alive:
            raise APIError(503, "the engine is not running", "server_error", code="engine_down")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(protocol.models_response(served))

    @app.get("/metrics")
    async def metrics() -> Response:
        text = render_prometheus(async_engine.stats(), async_engine.latency(), labels={"model": served})
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request) -> Response:
        return await handler.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request) -> Response:
        return await handler.chat(body, request)

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return _validation_api_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = "route not found" if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, message, type_, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Response:
        logger.error("unhandled error while serving a request", exc_info=exc)
        return APIError(500, "internal server error", "server_error").response()


def _validation_api_error(errors: Sequence[dict]) -> APIError:
    if not errors:
        return APIError(400, "invalid request")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return APIError(400, "malformed JSON body", code="invalid_json")
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if not loc:
        return APIError(400, f"request body: {err.get('msg', 'invalid request')}")
    field = loc[0]
    if field in _UNION_FIELDS and sum(1 for e in errors if _field_of(e) == field) > 1:
        return APIError(400, f"{field} must be {_UNION_FIELDS[field]}", param=field)
    return APIError(400, f"{'.'.join(loc)}: {err.get('msg', 'invalid value')}", param=field)


# Fields whose type is a union: pydantic reports one error per alternative; say what is accepted.
_UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token id lists",
    "stop": "a string or a list of strings",
    "messages": "a list of messages with a role and string or text-part content",
}


def _field_of(err: dict) -> str | None:
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    return loc[0] if loc else None


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
        admitted = await self._admit(rid, jobs, body.priority or 0, "prompt")
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
                                     body.priority or 0, "messages")
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
        return list(self.engine.tokenizer.encode(text))

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

    async def _admit(self, rid: str, jobs, priority: int, prompt_param: str) -> _Admitted:
        admitted = _Admitted()
        try:
            for index, prompt, params in jobs:
                stream = await self.engine.add_request(prompt, params, f"{rid}-{index}", priority)
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


# -- command line ------------------------------------------------------------------------

def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``ferry serve``: the engine's (engine/cli.py) plus the HTTP ones."""
    from engine.cli import add_engine_arguments
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-waiting", type=int, default=256,
                        help="admitted requests not running beyond which new ones get 503")
    parser.add_argument("--served-model-name", default=None, help="name clients use (default: the model's)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests may run after SIGINT/SIGTERM before abort")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def run_server(args: argparse.Namespace) -> None:
    """Build the engine from ``args``, wrap it in an AsyncEngine and serve it with uvicorn (blocks).

    Multi-host: every process runs this; process 0 serves HTTP, the others mirror
    its steps (engine/distributed.py) until it shuts down.
    """
    from engine.cli import engine_config_from_args

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = engine_config_from_args(args)
    if cfg.num_processes > 1:
        from engine.distributed import MultiHostEngine, initialize
        initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
        engine = MultiHostEngine(cfg)
        if not engine.is_leader:
            engine.follow()
            return
    else:
        from engine.llm_engine import LLMEngine   # heavy (JAX); imported only when serving
        engine = LLMEngine(cfg)
    async_engine = AsyncEngine(engine, max_waiting=args.max_waiting)
    app = build_app(async_engine, args.served_model_name, shutdown_timeout=args.shutdown_timeout)
    server = make_uvicorn_server(app, async_engine, args.host, args.port, args.shutdown_timeout, args.log_level)
    try:
        server.run()
    finally:
        if cfg.num_processes > 1:
            engine.stop()


def make_uvicorn_server(app: FastAPI, async_engine: AsyncEngine, host: str = "127.0.0.1", port: int = 8000,
                        shutdown_timeout: float = 30.0, log_level: str = "info"):
    """A ``uvicorn.Server`` for ``app`` whose shutdown is graceful for streams too.

    When uvicorn starts shutting down (SIGINT/SIGTERM or ``should_exit``) the engine
    stops admitting requests and aborts in-flight ones after ``shutdown_timeout``
    seconds, so every client still gets its final chunk and ``data: [DONE]``
    before uvicorn's own (longer) graceful-shutdown timeout cancels anything.
    """
    import uvicorn

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            async_engine.begin_shutdown(shutdown_timeout)
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(math.ceil(shutdown_timeout)) + 5)
    return _Server(config)


serve = run_server

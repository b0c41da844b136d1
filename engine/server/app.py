"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over an ``AsyncEngine``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
SSE streaming), ``GET /v1/models``, ``GET /health``, ``GET /metrics``.
Errors use OpenAI's JSON shape; no stack trace ever reaches a client.
With an API key every ``/v1`` route (and ``/metrics`` if asked) needs
``Authorization: Bearer KEY`` (engine/server/auth.py). ``ferry serve`` calls ``run_server``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
from typing import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ferry.engine.server import protocol
from ferry.engine.entrypoints.async_engine import AsyncEngine
from ferry.engine.server.auth import ApiKeyMiddleware, open_binding_warning
from ferry.engine.server.metrics import CONTENT_TYPE, make_registry
from ferry.engine.server.handlers import APIError, _Handler

logger = logging.getLogger(__name__)


def build_app(async_engine: AsyncEngine, model_name: str | None = None,
              shutdown_engine_on_exit: bool = True, shutdown_timeout: float = 30.0,
              api_key: str | None = None, metrics_require_api_key: bool = False) -> FastAPI:
    """The FastAPI application serving ``async_engine`` under the name ``model_name``.

    ``api_key``: if set, requests to ``/v1/*`` (and ``/metrics`` with ``metrics_require_api_key``)
    without ``Authorization: Bearer <api_key>`` get 401 before reaching any route.
    """
    served = model_name or async_engine.model_name
    registry = make_registry(async_engine.stats, async_engine.latency, labels={"model": served})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if shutdown_engine_on_exit:
            await async_engine.shutdown_async(shutdown_timeout)

    app = FastAPI(title="Ferry", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    handler = _Handler(async_engine, served)
    _install_error_handlers(app)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, guard_metrics=metrics_require_api_key)

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_alive:
            raise APIError(503, "the engine is not running", "server_error", code="engine_down")
        if not getattr(async_engine, "is_healthy", True):
            raise APIError(503, "the engine is recovering from a failed step", "server_error",
                           code="engine_recovering")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(protocol.models_response(served))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)

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


# -- command line ------------------------------------------------------------------------

def run_server(engine_config, server_config) -> None:
    """Build the engine, wrap it in an AsyncEngine and serve it with uvicorn (blocks).

    Multi-host: every process runs this; process 0 serves HTTP, the others mirror
    its steps (engine/distributed.py) until it shuts down.
    """
    cfg, sc = engine_config, server_config
    logging.basicConfig(level=sc.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = sc.resolved_api_key()
    warning = open_binding_warning(sc.host, api_key)
    if warning and cfg.process_id == 0:          # before the (long) engine start-up, so it is seen
        print(warning, file=sys.stderr, flush=True)
    if cfg.num_processes > 1:
        from ferry.engine.distributed import MultiHostEngine, initialize
        initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
        engine = MultiHostEngine(cfg)
        if not engine.is_leader:
            engine.follow()
            return
    else:
        from ferry.engine.llm_engine import LLMEngine   # heavy (JAX); imported only when serving
        engine = LLMEngine(cfg)
    async_engine = AsyncEngine(engine, max_waiting=sc.max_waiting)
    app = build_app(async_engine, sc.served_model_name, shutdown_timeout=sc.shutdown_timeout,
                    api_key=api_key, metrics_require_api_key=sc.metrics_require_api_key)
    server = make_uvicorn_server(app, async_engine, sc.host, sc.port, sc.shutdown_timeout, sc.log_level)
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


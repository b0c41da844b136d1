"""Settings of the HTTP server (``ferry serve``) beside ``EngineConfig``; no web imports here.

``api_key`` None means: take ``$FERRY_API_KEY`` if set (``resolved_api_key``), else serve
without a key.
"""
from __future__ import annotations

import dataclasses
import os

from ferry.engine.config import _opt


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = _opt("127.0.0.1", "address to bind", "server")
    port: int = _opt(8000, "port to listen on", "server")
    max_waiting: int = _opt(256, "admitted requests not running beyond which new ones get 503", "server")
    served_model_name: str | None = _opt(None, "name clients use (default: the model's)", "server")
    api_key: str | None = _opt(None, "require 'Authorization: Bearer KEY' on every /v1 route (default: "
                                     "$FERRY_API_KEY; unset: no key)", "server")
    metrics_require_api_key: bool = _opt(False, "require the API key on /metrics too (default: open, as "
                                                "vLLM's, so Prometheus scrapes without it)", "server")
    shutdown_timeout: float = _opt(30.0, "seconds in-flight requests may run after SIGINT/SIGTERM before abort",
                                   "server")
    log_level: str = _opt("info", "log level", "server", choices=("critical", "error", "warning", "info", "debug"),
                          flags=("--uvicorn-log-level",))

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty (leave it unset to serve without a key)")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")

    def __repr__(self) -> str:            # never print the key (logs, tracebacks)
        fields = ", ".join(f"{f.name}={'***' if f.name == 'api_key' and self.api_key else repr(getattr(self, f.name))}"
                           for f in dataclasses.fields(self))
        return f"ServerConfig({fields})"

    def resolved_api_key(self) -> str | None:
        """The key clients must send: ``api_key``, else ``$FERRY_API_KEY``, else None (no key)."""
        return self.api_key or os.environ.get("FERRY_API_KEY") or None

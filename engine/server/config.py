"""Settings of the HTTP server (``ferry serve``) beside ``EngineConfig``; no web imports here."""
from __future__ import annotations

import dataclasses

from ferry.engine.config import _opt


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = _opt("127.0.0.1", "address to bind", "server")
    port: int = _opt(8000, "port to listen on", "server")
    max_waiting: int = _opt(256, "admitted requests not running beyond which new ones get 503", "server")
    served_model_name: str | None = _opt(None, "name clients use (default: the model's)", "server")
    shutdown_timeout: float = _opt(30.0, "seconds in-flight requests may run after SIGINT/SIGTERM before abort",
                                   "server")
    log_level: str = _opt("info", "log level", "server",
                          choices=("critical", "error", "warning", "info", "debug"))

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")

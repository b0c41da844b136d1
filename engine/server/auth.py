"""API keys: ``Authorization: Bearer KEY`` on the OpenAI routes, checked before anything else runs.

``ApiKeyMiddleware`` is plain ASGI (no ``BaseHTTPMiddleware``, which would buffer and
wrap every streamed response): for a guarded path it compares the bearer token with the
key in constant time (``hmac.compare_digest`` over SHA-256 digests, so neither the
content nor the length of the key leaks through timing) and answers a missing or wrong
key with 401 and OpenAI's error body (``code: invalid_api_key``, as api.openai.com does)
before the request reaches a route, so it never reaches the engine. Guarded paths:
``/v1`` and everything under it, plus ``/metrics`` when asked; ``/health`` stays open.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json

from ferry.engine.server import protocol


def _digest(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header value (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


def key_matches(token: bytes | None, key_digest: bytes) -> bool:
    """Constant-time comparison of a presented token with the key (given as its SHA-256 digest)."""
    if token is None:
        return False
    return hmac.compare_digest(_digest(token), key_digest)


def is_guarded(path: str, guard_metrics: bool) -> bool:
    return path == "/v1" or path.startswith("/v1/") or (guard_metrics and path == "/metrics")


class ApiKeyMiddleware:
    """ASGI middleware: 401 for guarded HTTP paths without ``Authorization: Bearer <api_key>``."""

    def __init__(self, app, api_key: str, guard_metrics: bool = False):
        if not api_key:
            raise ValueError("ApiKeyMiddleware needs a non-empty api_key")
        self.app = app
        self._key_digest = _digest(api_key.encode())
        self.guard_metrics = guard_metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not is_guarded(scope.get("path", ""), self.guard_metrics):
            await self.app(scope, receive, send)
            return
        auth = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        if key_matches(bearer_token(auth), self._key_digest):
            await self.app(scope, receive, send)
            return
        message = ("missing API key: send it as 'Authorization: Bearer KEY'" if auth is None
                   else "incorrect API key provided")
        body = json.dumps(protocol.error_body(message, "invalid_request_error", None, "invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="ferry"')]})
        await send({"type": "http.response.body", "body": body})


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False                 # a host name other than localhost: assume it is reachable


def open_binding_warning(host: str, api_key: str | None) -> str | None:
    """The warning to print when ``host`` is reachable from other machines and no key is set, else None."""
    if api_key or is_loopback(host):
        return None
    return (f"WARNING: serving on {host} without an API key: anyone who can reach this port can use the "
            f"model. Pass --api-key KEY (or set FERRY_API_KEY), or bind 127.0.0.1.")

"""Shared helpers of the server tests: a real uvicorn server on a free 127.0.0.1 port in a thread."""
import contextlib
import socket
import threading
import time

from ferry.engine.entrypoints.async_engine import AsyncEngine
from ferry.engine.server.app import build_app, make_uvicorn_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(engine, max_waiting=300, name="fake", shutdown_timeout=2.0, holder=None, idle_poll_s=0.05,
          api_key=None, metrics_require_api_key=False):
    """Serve AsyncEngine(engine) (a FakeEngine or a real LLMEngine) with the graceful-shutdown
    uvicorn server; yield (url, async_engine). ``holder`` (a dict) receives the server as ``holder["server"]``.
    ``api_key``/``metrics_require_api_key``: as ``build_app``'s."""
    aeng = AsyncEngine(engine, max_waiting=max_waiting, idle_poll_s=idle_poll_s)
    port = free_port()
    app = build_app(aeng, name, shutdown_timeout=shutdown_timeout, api_key=api_key,
                    metrics_require_api_key=metrics_require_api_key)
    srv = make_uvicorn_server(app, aeng, "127.0.0.1", port, shutdown_timeout, "warning")
    if holder is not None:
        holder["server"] = srv
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(800):
        if srv.started:
            break
        time.sleep(0.025)
    assert srv.started, "the test server did not start"
    try:
        yield f"http://127.0.0.1:{port}", aeng
    finally:
        srv.should_exit = True
        th.join(30)
        aeng.shutdown(timeout=1.0)

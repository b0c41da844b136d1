"""Asyncio front end of the synchronous ``LLMEngine``.

The engine is single-threaded and not thread-safe, so ``AsyncEngine`` owns a
dedicated loop thread that is the only one ever touching it. Callers (any
asyncio event loop, any thread) send ``add`` / ``abort`` / ``shutdown``
commands through a thread-safe queue that the loop thread drains between
steps; outputs travel back with ``loop.call_soon_threadsafe`` into one
``asyncio.Queue`` per request.

Guarantees:

* ``ValueError`` from ``LLMEngine.add_request`` reaches the caller of
  ``add_request`` / ``generate`` unchanged.
* A caller that stops iterating or is cancelled aborts its request; the
  engine frees its pages at the next command drain (at most one step later).
* More than ``max_waiting`` admitted-but-not-running requests raise
  ``EngineOverloaded``.
* An exception inside ``step()`` fails every in-flight request with
  ``EngineStepError`` and the loop keeps serving.
* ``shutdown()`` lets in-flight requests finish until the timeout, then
  aborts the rest; every waiter gets a final output (or an error).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import uuid
from typing import AsyncIterator, Sequence

from ferry.engine.entrypoints.latency import HistogramSnapshot, LatencyRecorder
from ferry.engine.outputs import RequestOutput, RequestTimings
from ferry.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """The waiting room is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineClosed(RuntimeError):
    """The engine is shut down (or its loop died) and accepts no requests."""


class EngineStepError(RuntimeError):
    """An engine step raised; the requests in flight at that moment were failed."""


@dataclasses.dataclass(frozen=True)
class _Add:
    stream: "RequestStream"
    prompt: str | Sequence[int]
    params: SamplingParams
    priority: int
    length_hint: int | None = None


@dataclasses.dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclasses.dataclass(frozen=True)
class _Shutdown:
    deadline: float          # time.monotonic() after which in-flight requests are aborted


_ACCEPTED = object()         # sentinel: add_request succeeded inside the loop thread


class RequestStream:
    """Async iterator over the outputs of one request.

    Ends after the output with ``finished=True``; raises the error if the
    request failed. ``abort()`` (or ``aclose()``) cancels the request.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, engine: "AsyncEngine",
                 prompt: str | Sequence[int]):
        self.request_id = request_id
        self.finished = False
        self._loop = loop
        self._engine = engine
        self._queue: asyncio.Queue = asyncio.Queue()
        self._prompt = prompt
        self._arrival = time.time()
        self._last: RequestOutput | None = None     # written by the loop thread only

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Abort the request if it has not finished yet (idempotent, non-blocking)."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()

    async def _wait_accepted(self) -> None:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        assert item is _ACCEPTED, item

    def _deliver(self, item) -> bool:
        """Hand ``item`` to the caller's event loop (loop thread); False if that loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            return True
        except RuntimeError:
            return False


class AsyncEngine:
    """Runs an ``LLMEngine`` on its own thread and serves it to asyncio callers.

    ``engine`` must not be used by anybody else once passed here.
    ``max_waiting`` bounds admitted requests that are not running.
    """

    def __init__(self, engine, max_waiting: int = 256, retry_after: float = 1.0,
                 idle_poll_s: float = 0.5):
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self._engine = engine
        self.max_waiting = max_waiting
        self.retry_after = retry_after
        self._idle_poll_s = idle_poll_s
        self._commands: queue.Queue = queue.Queue()
        self._lock = threading.Lock()           # guards the counters and snapshot below
        self._closed = False
        self._in_flight = 0
        self._rejected = 0
        self._step_errors = 0
        self._finished_by_reason: dict[str, int] = {}
        self._snapshot: dict = {}
        self._streams: dict[str, RequestStream] = {}     # loop thread only
        self._shutdown_deadline: float | None = None     # loop thread only
        self._latency = LatencyRecorder()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ferry-engine-loop", daemon=True)
        self._thread.start()
        self._ready.wait(30.0)

    # -- read-only engine facts (immutable after construction) -----------------
    @property
    def tokenizer(self):
        return self._engine.tokenizer

    @property
    def model_name(self) -> str:
        return self._engine.model_name

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def is_alive(self) -> bool:
        """True while the loop thread runs and new requests are accepted."""
        return self._thread.is_alive() and not self._closed

    @property
    def is_healthy(self) -> bool:
        """Alive, and the engine can serve (False while it rebuilds after a failed step)."""
        return self.is_alive and bool(getattr(self._engine, "healthy", True))

    # -- caller API ---------------------------------------------------------------
    async def add_request(self, prompt: str | Sequence[int], params: SamplingParams,
                          request_id: str | None = None, priority: int = 0,
                          length_hint: int | None = None) -> RequestStream:
        """Admit one request and return its output stream (``length_hint``: ``LLMEngine.add_request``'s).

        Raises ``ValueError`` (invalid request), ``EngineOverloaded`` or ``EngineClosed``.
        """
        rid = request_id or uuid.uuid4().hex
        stream = RequestStream(rid, asyncio.get_running_loop(), self, prompt)
        with self._lock:
            if self._closed or not self._thread.is_alive():
                raise EngineClosed("the engine is shut down")
            pending = self._in_flight - int(self._snapshot.get("running", 0))
            if pending >= self.max_waiting:
                self._rejected += 1
                raise EngineOverloaded(f"the server is overloaded ({pending} requests waiting); "
                                       "retry later", self.retry_after)
            self._in_flight += 1
            self._commands.put(_Add(stream, prompt, params, priority, length_hint))
        try:
            await stream._wait_accepted()
        except asyncio.CancelledError:
            self.abort(rid)
            raise
        return stream

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams,
                       request_id: str | None = None, priority: int = 0,
                       length_hint: int | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they are produced; the last has ``finished=True``.

        Closing the generator early (or cancelling the task) aborts the request.
        """
        stream = await self.add_request(prompt, params, request_id, priority, length_hint)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Abort a request by id (thread-safe, non-blocking; unknown ids are ignored)."""
        self._commands.put(_Abort(request_id))

    def stats(self) -> dict:
        """Snapshot of the engine stats plus async-layer counters (thread-safe)."""
        with self._lock:
            snap = dict(self._snapshot)
            snap.update(in_flight=self._in_flight, rejected_total=self._rejected,
                        step_errors_total=self._step_errors, max_waiting=self.max_waiting,
                        finished_by_reason=dict(self._finished_by_reason))
        snap["pending"] = max(0, snap["in_flight"] - int(snap.get("running", 0)))
        return snap

    def latency(self) -> dict[str, HistogramSnapshot]:
        """TTFT / inter-token / completion-time histogram snapshots (thread-safe)."""
        return self._latency.snapshot()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting requests, let in-flight ones run for up to ``timeout`` s, abort the rest.

        Blocks until the loop thread exits. Every waiter receives a final output.
        """
        self.begin_shutdown(timeout)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout + 10.0)

    def begin_shutdown(self, timeout: float = 30.0) -> None:
        """Non-blocking ``shutdown``: refuse new requests now, abort in-flight ones after ``timeout`` s."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._commands.put(_Shutdown(time.monotonic() + timeout))

    async def shutdown_async(self, timeout: float = 30.0) -> None:
        """``shutdown`` without blocking the calling event loop."""
        await asyncio.to_thread(self.shutdown, timeout)

    # -- loop thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._refresh_stats()
            self._ready.set()
            consecutive_errors = 0
            while True:
                self._drain(block=not self._engine.has_unfinished_requests())
                if self._shutdown_deadline is not None and (
                        not self._engine.has_unfinished_requests()
                        or time.monotonic() >= self._shutdown_deadline):
                    break
                if self._engine.has_unfinished_requests():
                    if self._step():
                        consecutive_errors = 0
                    else:
                        consecutive_errors += 1
                        time.sleep(min(1.0, 0.005 * 2 ** min(consecutive_errors, 8)))
                self._refresh_stats()
            self._abort_everything()
        except BaseException:   # a bug in this loop: fail everyone loudly, never hang them
            logger.exception("engine loop crashed")
            self._fail_all(EngineClosed("the engine loop crashed"), abort_in_engine=False)
        finally:
            with self._lock:
                self._closed = True
            self._reject_pending_commands()
            self._ready.set()
            self._refresh_stats()

    def _reject_pending_commands(self) -> None:
        """After the loop ends: answer adds still queued (only possible after a crash)."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                with self._lock:                 # count first: a caller woken by the error sees 0
                    self._in_flight -= 1
                cmd.stream._deliver(EngineClosed("the engine is shut down"))

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=self._idle_poll_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd) -> None:
        if isinstance(cmd, _Add):
            stream = cmd.stream
            try:
                self._engine.add_request(stream.request_id, cmd.prompt, cmd.params, cmd.priority,
                                         length_hint=cmd.length_hint)
            except Exception as exc:     # ValueError for bad input; anything else is a bug
                if not isinstance(exc, ValueError):
                    logger.exception("add_request failed for %s", stream.request_id)
                with self._lock:
                    self._in_flight -= 1
                stream._deliver(exc)
                return
            self._streams[stream.request_id] = stream
            if not stream._deliver(_ACCEPTED):
                self._abort_in_engine(stream.request_id)
        elif isinstance(cmd, _Abort):
            if cmd.request_id in self._streams:
                self._abort_in_engine(cmd.request_id)
        elif isinstance(cmd, _Shutdown):
            self._shutdown_deadline = cmd.deadline

    def _step(self) -> bool:
        try:
            outputs = self._engine.step()
        except Exception as exc:
            logger.exception("engine step failed; failing %d in-flight requests", len(self._streams))
            with self._lock:
                self._step_errors += 1
            self._fail_all(EngineStepError(f"engine step failed: {type(exc).__name__}: {exc}"),
                           abort_in_engine=True)
            return False
        self._dispatch(outputs)
        return True

    def _dispatch(self, outputs: Sequence[RequestOutput]) -> None:
        now = time.time()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue                 # e.g. the abort output of a request already failed
            self._latency.observe(out, now)
            stream._last = out
            if out.finished:    # release first: a caller seeing the end may submit again at once
                self._release(out.request_id, out.finish_reason or "unknown")
            if not stream._deliver(out) and not out.finished:
                self._abort_in_engine(out.request_id)   # its event loop is gone

    def _abort_in_engine(self, request_id: str) -> None:
        try:
            self._engine.abort_request(request_id)
        except Exception:
            logger.exception("abort_request(%s) failed", request_id)

    def _release(self, request_id: str, reason: str) -> None:
        self._streams.pop(request_id, None)
        self._latency.forget(request_id)
        with self._lock:
            self._in_flight -= 1
            self._finished_by_reason[reason] = self._finished_by_reason.get(reason, 0) + 1

    def _fail_all(self, error: BaseException, abort_in_engine: bool) -> None:
        for rid, stream in list(self._streams.items()):
            if abort_in_engine:
                self._abort_in_engine(rid)
            self._release(rid, "error")
            stream._deliver(error)

    def _abort_everything(self) -> None:
        """Shutdown: abort what is left, flush the abort outputs, synthesise any missing."""
        if not self._streams:
            return
        for rid in list(self._streams):
            self._abort_in_engine(rid)
        try:
            if self._engine.has_unfinished_requests():
                self._dispatch(self._engine.step())
        except Exception:
            logger.exception("final step during shutdown failed")
        now = time.time()
        for rid, stream in list(self._streams.items()):
            self._release(rid, "abort")
            stream._deliver(_abort_output(stream, now))

    def _refresh_stats(self) -> None:
        try:
            snap = dict(self._engine.stats())
        except Exception:
            logger.exception("engine.stats() failed")
            return
        with self._lock:
            self._snapshot = snap


def _abort_output(stream: RequestStream, now: float) -> RequestOutput:
    """A final "abort" output for a request the engine did not report on."""
    last = stream._last
    if last is not None:
        return dataclasses.replace(
            last, delta_text="", delta_token_ids=(), finished=True, finish_reason="abort",
            timings=RequestTimings(last.timings.arrival, last.timings.first_token, now),
            delta_logprobs=() if last.logprobs is not None else None)
    prompt = stream._prompt
    return RequestOutput(
        request_id=stream.request_id, prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=() if isinstance(prompt, str) else tuple(prompt), text="", token_ids=(),
        delta_text="", delta_token_ids=(), finished=True, finish_reason="abort",
        timings=RequestTimings(stream._arrival, None, now))

"""Proves nothing compiles while serving: counts XLA programs lowered during each step.

JAX records a monitoring event each time it lowers a new program to XLA
(whether or not the persistent cache then supplies the binary). The guard
counts those events; after ``arm()`` (end of warm-up) every engine call runs
inside ``watch(where)``, and a program lowered inside it is a violation:
raised as ``CompileError`` when strict, else logged. The message names
``where`` (the engine passes the bucket, e.g. ``decode B=8 C=4``), and each
program lowered with its argument shapes.

Only the watching thread's own lowerings count: JAX lowers on the thread that
calls the function, so a compile by another thread (eager JAX in a client, a
second engine) during a watch of the engine's thread is not a violation.

The event is private to JAX. So that the guard can never pass while checking
nothing, construction compiles a tiny fresh function and raises
``RuntimeError`` if the event did not arrive (the hook is gone or renamed).
"""
from __future__ import annotations

import contextlib
import logging
import threading

import jax
import numpy as np

_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
# JAX logs "Compiling <name> with global shapes and types <avals>" just before lowering (at DEBUG
# unless jax_log_compiles); the guard reads the shapes from it. Best effort: only the names if absent.
_SHAPES_LOGGER = "jax._src.interpreters.pxla"
_SHAPES_PREFIX = "Compiling %s with global shapes and types"
log = logging.getLogger("ferry")


class CompileError(RuntimeError):
    """Raised by a strict guard when a program compiled after warm-up."""


class _Frame:
    """One active ``watch`` on one thread: the programs lowered inside it."""

    def __init__(self) -> None:
        self.programs: list[str] = []      # names from the monitoring event (always)
        self.shape_log: list[str] = []     # "name with [avals]" from JAX's log (best effort)


_shapes = threading.local()          # .frames: frames of every guard watching on this thread


class _ShapeCapture(logging.Filter):
    """Copies "Compiling ... with global shapes" records into the thread's active frames."""

    def __init__(self, passthrough_level: int) -> None:
        super().__init__()
        self.passthrough_level = passthrough_level

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_SHAPES_PREFIX) and len(record.args or ()) >= 2:
            for frame in getattr(_shapes, "frames", ()):
                frame.shape_log.append(f"{record.args[0]} with {record.args[1]}")
        return record.levelno >= self.passthrough_level   # hide the DEBUG records we asked for


def _install_shape_capture() -> None:
    logger = logging.getLogger(_SHAPES_LOGGER)
    if any(isinstance(f, _ShapeCapture) for f in logger.filters):
        return
    logger.addFilter(_ShapeCapture(logger.getEffectiveLevel()))
    if logger.getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.DEBUG)


class CompileGuard:
    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.count = 0              # programs lowered in this process since the guard was made (all threads)
        self.violations = 0         # programs lowered inside watch() after arm()
        self.armed = False
        self._local = threading.local()
        register = getattr(getattr(jax, "monitoring", None), "register_event_duration_secs_listener", None)
        if register is None:
            raise RuntimeError("CompileGuard needs jax.monitoring.register_event_duration_secs_listener, "
                               "which this JAX does not have: the guard could not check anything")
        register(self._on_event)
        _install_shape_capture()
        self._self_test()

    def _frames(self) -> list[_Frame]:
        frames = getattr(self._local, "frames", None)
        if frames is None:
            frames = self._local.frames = []
        return frames

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == _LOWER_EVENT:
            self.count += 1
            for frame in self._frames():
                frame.programs.append(str(kwargs.get("fun_name", "?")))

    def _self_test(self) -> None:
        """Lower a fresh tiny program on this thread; the guard must see it, or it could never fail."""
        frame = _Frame()
        frames = self._frames()
        frames.append(frame)
        try:
            jax.jit(lambda x: x + 1)(np.zeros((1,), np.int32)).block_until_ready()
        finally:
            frames.remove(frame)
        if not frame.programs:
            raise RuntimeError(f"CompileGuard: JAX no longer records the {_LOWER_EVENT!r} monitoring event, so "
                               "the guard would check nothing; update engine/compile_guard.py for this JAX")

    def arm(self) -> None:
        """Call after warm-up: from now on, a compile inside watch() is a violation."""
        self.armed = True

    @contextlib.contextmanager
    def watch(self, where: str):
        """Count programs this thread lowers inside the block; after ``arm()`` any is a violation."""
        frame = _Frame()
        frames = self._frames()
        frames.append(frame)
        shape_frames = _shapes.__dict__.setdefault("frames", [])
        shape_frames.append(frame)
        try:
            yield
        finally:
            frames.remove(frame)
            shape_frames.remove(frame)
        n = len(frame.programs)
        if self.armed and n:
            self.violations += n
            what = "; ".join(frame.shape_log) or ", ".join(frame.programs)
            msg = (f"{n} XLA program(s) compiled after warm-up (at {where}): a shape escaped the bucket table: "
                   f"{what}")
            if self.strict:
                raise CompileError(msg)
            log.warning(msg)

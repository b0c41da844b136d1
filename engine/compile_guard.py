"""Proves nothing compiles while serving: counts XLA programs lowered during each step.

JAX records a monitoring event each time it lowers a new program to XLA
(whether or not the persistent cache then supplies the binary). The guard
counts those events; after ``arm()`` (end of warm-up) every engine call runs
inside ``watch(where)``, and a program lowered inside it is a violation:
raised as ``CompileError`` when strict, else logged. Only the engine thread's
own calls are watched, so eager JAX elsewhere in the process does not count.
"""
from __future__ import annotations

import contextlib
import logging

import jax

_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
log = logging.getLogger("ferry")


class CompileError(RuntimeError):
    """Raised by a strict guard when a program compiled after warm-up."""


class CompileGuard:
    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.count = 0              # programs lowered in this process since the guard was made
        self.violations = 0         # programs lowered inside watch() after arm()
        self.armed = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == _LOWER_EVENT:
            self.count += 1

    def arm(self) -> None:
        """Call after warm-up: from now on, a compile inside watch() is a violation."""
        self.armed = True

    @contextlib.contextmanager
    def watch(self, where: str):
        before = self.count
        yield
        n = self.count - before
        if self.armed and n:
            self.violations += n
            msg = f"{n} XLA program(s) compiled after warm-up (at {where}): a shape escaped the bucket table"
            if self.strict:
                raise CompileError(msg)
            log.warning(msg)

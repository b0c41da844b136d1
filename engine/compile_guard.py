"""Counts XLA programs lowered in this process, to prove nothing compiles while serving.

JAX records a monitoring event each time it lowers a new program to XLA
(whether or not the persistent cache then supplies the binary). The guard
counts those events; ``check()`` after warm-up raises (strict) or warns if
the count moved. Events from other threads count too, so run one engine per
process when strict.
"""
from __future__ import annotations

import logging

import jax

_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
log = logging.getLogger("ferry")


class CompileError(RuntimeError):
    """Raised by a strict guard when a program compiled after warm-up."""


class CompileGuard:
    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.count = 0
        self._armed_at: int | None = None
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == _LOWER_EVENT:
            self.count += 1

    def arm(self) -> None:
        """Call after warm-up: from now on, any compile is a violation."""
        self._armed_at = self.count

    @property
    def compiles_since_arm(self) -> int:
        return 0 if self._armed_at is None else self.count - self._armed_at

    def check(self, where: str) -> None:
        n = self.compiles_since_arm
        if n:
            msg = f"{n} XLA program(s) compiled after warm-up (at {where}): a shape escaped the bucket table"
            if self.strict:
                raise CompileError(msg)
            log.warning(msg)
            self._armed_at = self.count

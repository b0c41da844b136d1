"""Compiled step programs: an explicit shape table, compiled up front or on first use.

``Program(name, jitted_fn)`` keeps one executable per bucket key. ``get(key, args)``
returns it, compiling on a miss (``args`` are example arguments of that shape), and
counts what it built and how long it took (the start-up log, ``ferry generate -v``).
Compiles go through JAX's persistent compilation cache (``compile_cache_dir``), so a
warm start pays tracing and lowering only (default model, 2-core CPU: trace 0.7 s,
lower 0.2 s, compile 7.5 s cold per decode program).

Not done: caching the executables themselves (``jax.experimental.serialize_executable``)
to skip tracing too. Tried on XLA:CPU with JAX 0.10.2: a deserialized decode program
failed at run time ("Function select_concatenate_fusion.1 not found"), and under 8 host
devices expected 8 shards per argument, so it was removed.
"""
from __future__ import annotations

import time


class Program:
    """One jitted function and its executables, one per bucket key.

    ``fn``: a jitted function, or ``make(key) -> jitted function`` with ``per_key=True``
    (for programs whose bucket fixes a static value, e.g. the decode context width)."""

    def __init__(self, name: str, fn, per_key: bool = False) -> None:
        self.name, self.fn, self.per_key = name, fn, per_key
        self.executables: dict = {}
        self.compile_seconds = 0.0
        self.compiled = 0

    def get(self, key, args):
        exe = self.executables.get(key)
        if exe is None:
            exe = self.executables[key] = self._build(key, args)
        return exe

    def __call__(self, key, *args):
        return self.get(key, args)(*args)

    def _build(self, key, args):
        t0 = time.perf_counter()
        fn = self.fn(key) if self.per_key else self.fn
        exe = fn.lower(*args).compile()
        self.compiled += 1
        self.compile_seconds += time.perf_counter() - t0
        return exe

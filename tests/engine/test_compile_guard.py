"""The compile guard fails when a shape escapes the buckets, fails loudly without its JAX hook,
and watches only the thread that entered ``watch`` (as its docstring says)."""
import logging
import threading

import jax
import numpy as np
import pytest

from ferry.engine import compile_guard
from ferry.engine.compile_guard import CompileError, CompileGuard


def _warm(guard: CompileGuard):
    """A jitted function compiled for float32[4] during 'warm-up', then the guard armed."""
    f = jax.jit(lambda x: x * 2 + 1)
    with guard.watch("warm-up"):
        f(np.ones(4, np.float32)).block_until_ready()
    guard.arm()
    return f


def test_a_shape_escaping_the_buckets_raises_and_names_it():
    guard = CompileGuard(strict=True)
    f = _warm(guard)
    bucketed, escaped = np.ones(4, np.float32), np.ones((5, 3), np.float32)
    with guard.watch("decode B=4"):                       # positive control: a warmed shape is fine
        f(bucketed).block_until_ready()
    assert guard.violations == 0
    with pytest.raises(CompileError, match=r"at decode B=5\).*float32\[5,3\]"):
        with guard.watch("decode B=5"):
            f(escaped).block_until_ready()
    assert guard.violations == 1


def test_non_strict_guard_logs_and_counts(caplog):
    guard = CompileGuard(strict=False)
    f = _warm(guard)
    x = np.ones(7, np.float32)
    with caplog.at_level(logging.WARNING, logger="ferry"):
        with guard.watch("prefill T=7"):
            f(x).block_until_ready()
    assert guard.violations == 1 and "float32[7]" in caplog.text and "prefill T=7" in caplog.text


def test_compiles_before_arm_are_not_violations():
    guard = CompileGuard(strict=True)
    f = jax.jit(lambda x: x - 1)
    with guard.watch("warm-up"):
        f(np.ones(3, np.float32)).block_until_ready()
    assert guard.violations == 0 and guard.count >= 1


def test_missing_event_fails_at_construction(monkeypatch):
    monkeypatch.setattr(compile_guard, "_LOWER_EVENT", "/jax/core/compile/renamed_in_a_future_jax")
    with pytest.raises(RuntimeError, match="no longer records"):
        CompileGuard(strict=True)


def test_missing_listener_api_fails_at_construction(monkeypatch):
    monkeypatch.delattr(jax.monitoring, "register_event_duration_secs_listener")
    with pytest.raises(RuntimeError, match="register_event_duration_secs_listener"):
        CompileGuard()


def test_only_the_watching_thread_counts():
    guard = CompileGuard(strict=True)
    f = _warm(guard)
    errors = []

    def other_thread(watch: bool):
        try:
            if watch:
                with guard.watch("other thread"):
                    f(np.ones(9, np.float32)).block_until_ready()
            else:
                f(np.ones(11, np.float32)).block_until_ready()     # eager JAX elsewhere in the process
        except CompileError as e:
            errors.append(str(e))

    with guard.watch("engine step"):                     # a compile on another thread during the watch
        t = threading.Thread(target=other_thread, args=(False,))
        t.start()
        t.join()
    assert guard.violations == 0 and not errors
    # positive control: the same kind of compile inside that thread's own watch is caught there
    t = threading.Thread(target=other_thread, args=(True,))
    t.start()
    t.join()
    assert guard.violations == 1 and len(errors) == 1 and "float32[9]" in errors[0]

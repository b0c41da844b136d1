"""Multi-host runs: ``jax.distributed`` + one engine replica per process, driven in lockstep.

Every process builds the same ``LLMEngine`` over one global mesh (tensor
parallel across all processes' devices) and must run exactly the same jitted
steps in the same order, or the collectives inside them deadlock.

How the processes agree (a deterministic scheduler fed the same inputs, not a
broadcast of each Plan): process 0 (the leader) takes requests; at every step
it broadcasts the commands that arrived since the previous step (add with the
token ids and a resolved seed, abort, stop) plus its clock reading. Each
follower applies the same commands to its replica and steps with the leader's
clock, so its scheduler produces the same Plan. Commands are a few hundred
bytes per step where a Plan with block tables and swap lists is larger and
would still need the requests' tokens on every process. Before any program of
a step is dispatched, every process all-gathers a digest of its Plan
(``check_plan``, 16 bytes): a divergence raises on every process at that point,
before the diverged step's collectives could block
(tests/engine/test_tensor_parallel.py::test_diverged_plans_fail_on_every_process).

The broadcast moves a fixed-size ``u8[CHUNK]`` buffer (several when needed)
so it compiles once, during start-up. Payloads are pickled: the processes of
one job trust each other (the same trust the JAX coordinator already assumes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import pickle
import time

import numpy as np

CHUNK = 1 << 16            # bytes per broadcast program
HEARTBEAT_S = 5.0          # an idle leader still syncs this often, so followers never sit in a
                           # collective long enough to hit the collectives' timeouts


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """``jax.distributed.initialize`` with CPU collectives over gloo (used by the CPU tests)."""
    import jax
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def broadcast_bytes(payload: bytes | None) -> bytes:
    """Process 0's ``payload`` on every process (others pass None)."""
    import jax
    from jax.experimental import multihost_utils

    leader = jax.process_index() == 0
    data = payload if leader else b""
    buf = np.zeros(CHUNK, np.uint8)
    if leader:
        head = len(data).to_bytes(8, "little") + data[:CHUNK - 8]
        buf[:len(head)] = np.frombuffer(head, np.uint8)
    first = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    n = int.from_bytes(first[:8].tobytes(), "little")
    out = [first[8:8 + n].tobytes()]
    got = min(n, CHUNK - 8)
    while got < n:
        buf = np.zeros(CHUNK, np.uint8)
        if leader:
            part = data[got:got + CHUNK]
            buf[:len(part)] = np.frombuffer(part, np.uint8)
        chunk = np.asarray(multihost_utils.broadcast_one_to_all(buf))
        take = min(CHUNK, n - got)
        out.append(chunk[:take].tobytes())
        got += take
    return b"".join(out)


def plan_digest(plan) -> str:
    return hashlib.sha1(repr(plan).encode()).hexdigest()[:16] if plan is not None else ""


class PlanDivergence(RuntimeError):
    """The processes of a multi-host run planned different steps."""


def check_plan(plan) -> None:
    """All-gather every process's digest of ``plan`` (u8[16]); raise ``PlanDivergence`` on every
    process if any differs. Called by the engine between planning and dispatch."""
    from jax.experimental import multihost_utils
    mine = np.frombuffer(plan_digest(plan).encode().ljust(16, b"-"), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))          # u8[processes, 16]
    if (every != mine[None]).any():
        digests = [row.tobytes().decode() for row in every]
        raise PlanDivergence(f"multi-host divergence before dispatch: plan digests by process {digests}")


@dataclasses.dataclass(frozen=True)
class AddCommand:
    """A request the leader accepted: its token ids, and params with the seed resolved."""
    request_id: str
    prompt_ids: tuple[int, ...]
    params: object           # SamplingParams
    priority: int
    now: float               # the leader's clock when it was added (its arrival time everywhere)
    length_hint: int | None


@dataclasses.dataclass(frozen=True)
class AbortCommand:
    request_id: str


@dataclasses.dataclass(frozen=True)
class ReleaseCommand:
    """End the followers' ``follow(until_release=True)`` (the end of a generate call)."""


@dataclasses.dataclass(frozen=True)
class StopCommand:
    """End the followers' ``follow()``."""


Command = AddCommand | AbortCommand | ReleaseCommand | StopCommand


@dataclasses.dataclass(frozen=True)
class _Sync:
    commands: tuple[Command, ...]     # in the order the leader took them
    now: float                        # the leader's clock: every process plans with it


class MultiHostEngine:
    """``LLMEngine`` API on every process; only the leader's add/abort calls count.

    Leader: use it like an ``LLMEngine`` (``add_request``, ``abort_request``,
    ``step``, ...). Followers: call ``follow()``, which steps in lockstep until
    the leader calls ``stop()``.
    """

    def __init__(self, config) -> None:
        import jax
        from ferry.engine.llm_engine import LLMEngine

        self.engine = LLMEngine(config)
        self.engine._fixed_clock = True
        self.is_leader = jax.process_index() == 0
        self._commands: list[Command] = []
        self._seed_rng = np.random.default_rng(config.seed)
        self.stopped = False
        self.released = False
        self._last_sync = time.monotonic()
        broadcast_bytes(pickle.dumps(None) if self.is_leader else None)     # compile the collectives now
        check_plan(None)
        self.engine.plan_check = check_plan

    def __getattr__(self, name):          # tokenizer, model_config, max_model_len, stats, ...
        return getattr(self.engine, name)

    # ----------------------------------------------------------------- leader side
    def add_request(self, request_id, prompt, params=None, priority: int = 0, now: float | None = None,
                    length_hint: int | None = None) -> None:
        """Validate on the leader (ValueError as usual), then queue the add for every process."""
        from ferry.engine.sampling_params import SamplingParams
        if not self.is_leader:
            raise RuntimeError("only process 0 takes requests; followers call follow()")
        params = params if params is not None else SamplingParams()
        if isinstance(params, SamplingParams) and params.seed is None:
            params = dataclasses.replace(params, seed=int(self._seed_rng.integers(0, 2**31 - 1)))
        if isinstance(prompt, str):
            prompt = self.engine.tokenizer.encode(prompt)
        now = time.monotonic() if now is None else now
        self.engine.add_request(request_id, prompt, params, priority=priority, now=now, length_hint=length_hint)
        self._commands.append(AddCommand(request_id, tuple(prompt), params, priority, now, length_hint))

    def abort_request(self, request_id: str) -> None:
        if self.is_leader:
            self.engine.abort_request(request_id)
            self._commands.append(AbortCommand(request_id))

    def release(self) -> None:
        """Leader: end the followers' current ``follow(until_release=True)`` (end of a generate call)."""
        if self.is_leader:
            self._commands.append(ReleaseCommand())
            self._sync()

    def stop(self) -> None:
        """Leader: release the followers (their ``follow()`` returns)."""
        if self.is_leader and not self.stopped:
            self._commands.append(StopCommand())
            self._sync()
            self.stopped = True

    # ----------------------------------------------------------------- both sides
    def _sync(self) -> _Sync:
        self.released = False
        self._last_sync = time.monotonic()
        payload = None
        if self.is_leader:
            payload = pickle.dumps(_Sync(tuple(self._commands), time.monotonic()))
            self._commands = []
        with self.engine.guard.watch("multi-host broadcast"):
            sync: _Sync = pickle.loads(broadcast_bytes(payload))
        if not self.is_leader:
            for cmd in sync.commands:
                if isinstance(cmd, AddCommand):
                    self.engine.add_request(cmd.request_id, list(cmd.prompt_ids), cmd.params, priority=cmd.priority,
                                            now=cmd.now, length_hint=cmd.length_hint)
                elif isinstance(cmd, AbortCommand):
                    self.engine.abort_request(cmd.request_id)
                elif isinstance(cmd, StopCommand):
                    self.stopped = True
                elif isinstance(cmd, ReleaseCommand):
                    self.released = True
        return sync

    def step(self):
        """One lockstep iteration (leader and followers alike)."""
        sync = self._sync()
        if self.stopped:
            return []
        return self.engine.step(now=sync.now)

    def has_unfinished_requests(self) -> bool:
        """True also when an idle leader owes the followers a heartbeat step."""
        heartbeat = self.is_leader and time.monotonic() - self._last_sync > HEARTBEAT_S
        return self.engine.has_unfinished_requests() or bool(self._commands) or heartbeat

    def follow(self, until_release: bool = False) -> list:
        """Follower loop: mirror the leader's steps until it stops (or releases); returns the
        outputs this replica produced (identical to the leader's)."""
        outs = []
        while not self.stopped:
            outs += self.step()
            if until_release and self.released:
                break
        return outs

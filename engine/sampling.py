"""On-device sampling with per-row parameters (never static, so never a recompile).

``SamplingBatch`` holds one row per sequence. ``sample(logits, sb)`` applies
penalties, then greedy (temperature 0) or temperature / top-k / top-p / min-p
sampling with one uniform per row from the key ``fold_in(PRNGKey(seed), step)``
(step = number of tokens the request generated before this one), so a seeded request gives the
same tokens whatever it is batched with, and after preemption or swaps. Penalty statistics
(``Penalties``) live on device per batch slot (engine/slots.py) and are updated in place as
tokens are sampled; the host never uploads a token history.
It also returns the sampled token's logprob and the top-n alternatives
(of the model's raw distribution), and whether the row hit a stop id.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ferry.engine.sampling_params import MAX_LOGPROBS, MAX_STOP_IDS, SamplingParams
from ferry.engine.truncation import draw_plain, draw_truncated, truncates


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters of one program call (device arrays, or numpy before upload)."""

    temperature: jax.Array     # f32[B]   0 = greedy
    top_k: jax.Array           # i32[B]   <= 0: off
    top_p: jax.Array           # f32[B]
    min_p: jax.Array           # f32[B]
    seed: jax.Array            # u32[B]
    step: jax.Array            # i32[B]   tokens generated so far by the request
    presence: jax.Array        # f32[B]
    frequency: jax.Array       # f32[B]
    repetition: jax.Array      # f32[B]
    stop_ids: jax.Array        # i32[B, MAX_STOP_IDS] -1 padded (EOS included unless ignore_eos)
    num_logprobs: jax.Array    # i32[B]   top-n alternatives wanted (0: none)
    max_tokens: jax.Array      # i32[B]   the request's max_tokens (0 = padding row, never finishes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Penalties:
    """Token statistics for presence / frequency / repetition penalties, kept on device per row.

    counts: f32[B, V] times each token was generated (output tokens only);
    seen:   bool[B, V] token appeared in the prompt or the output (repetition penalty).
    """

    counts: jax.Array
    seen: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingRow:
    """One request's sampling inputs on the host (the row of a ``SamplingBatch``)."""

    params: SamplingParams
    seed: int
    step: int                          # tokens generated so far
    stop_ids: tuple[int, ...] = ()


def host_rows(rows: list[SamplingRow], B: int) -> dict[str, np.ndarray]:
    """numpy arrays for ``SamplingBatch`` (padding rows are greedy no-ops that never finish)."""
    a = {
        "temperature": np.zeros(B, np.float32), "top_k": np.zeros(B, np.int32),
        "top_p": np.ones(B, np.float32), "min_p": np.zeros(B, np.float32),
        "seed": np.zeros(B, np.uint32), "step": np.zeros(B, np.int32),
        "presence": np.zeros(B, np.float32), "frequency": np.zeros(B, np.float32),
        "repetition": np.ones(B, np.float32), "stop_ids": np.full((B, MAX_STOP_IDS), -1, np.int32),
        "num_logprobs": np.zeros(B, np.int32), "max_tokens": np.zeros(B, np.int32),
    }
    for i, r in enumerate(rows):
        p = r.params
        a["temperature"][i] = p.temperature
        a["top_k"][i] = p.top_k
        a["top_p"][i] = p.top_p
        a["min_p"][i] = p.min_p
        a["seed"][i] = r.seed & 0xFFFFFFFF
        a["step"][i] = r.step
        a["presence"][i] = p.presence_penalty
        a["frequency"][i] = p.frequency_penalty
        a["repetition"][i] = p.repetition_penalty
        stops = r.stop_ids[:MAX_STOP_IDS]
        a["stop_ids"][i, :len(stops)] = stops
        a["num_logprobs"][i] = p.logprobs or 0
        a["max_tokens"][i] = p.max_tokens
    return a


def has_penalty(p: SamplingParams) -> bool:
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)


def host_penalties(tokens: list[int], num_prompt: int, V: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts f32[V], seen bool[V]) of one request from its prompt + output tokens."""
    counts = np.zeros(V, np.float32)
    seen = np.zeros(V, bool)
    np.add.at(counts, np.asarray(tokens[num_prompt:], np.int64), 1.0)
    seen[np.asarray(tokens, np.int64)] = True
    return counts, seen


def any_penalty(sb: SamplingBatch):
    return jnp.any((sb.presence != 0) | (sb.frequency != 0) | (sb.repetition != 1))


def apply_penalties(logits, sb: SamplingBatch, pen: Penalties):
    rep = sb.repetition[:, None]
    logits = jnp.where(pen.seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - sb.frequency[:, None] * pen.counts
    return logits - sb.presence[:, None] * (pen.counts > 0)


def _uniforms(sb: SamplingBatch):
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(sb.seed, sb.step)
    return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)


def _draw(logits, sb: SamplingBatch, *, candidates: tuple[int, ...] = (1024, 8192), select: str = "auto",
          compaction_impl: str = "auto"):
    """Temperature / top-k / top-p / min-p sampling (engine/truncation.py), one uniform per row."""
    B, V = logits.shape
    x = logits / jnp.maximum(sb.temperature, 1e-6)[:, None]
    u = _uniforms(sb)
    trunc = truncates(sb, V)
    zeros = jnp.zeros((B,), jnp.int32)
    cut = jax.lax.cond(jnp.any(trunc), lambda: draw_truncated(
        x, u, sb, candidates=candidates, select=select, compaction_impl=compaction_impl), lambda: zeros)
    plain = jax.lax.cond(jnp.any((sb.temperature > 0) & ~trunc), lambda: draw_plain(x, u), lambda: zeros)
    return jnp.where(trunc, cut, plain)


def _top_logprobs(raw_lp):
    top_lp, top_ids = jax.lax.top_k(raw_lp, MAX_LOGPROBS)
    return top_lp, top_ids.astype(jnp.int32)


def sample(logits, sb: SamplingBatch, penalties=None, *, candidates: tuple[int, ...] = (1024, 8192),
           select: str = "auto", compaction_impl: str = "auto"):
    """logits f32[B, V] -> (tokens i32[B], logprob f32[B], top_ids i32[B, N],
    top_logprobs f32[B, N], hit_stop bool[B]).

    ``penalties``: None, a ``Penalties``, or a zero-argument function returning one
    (called only inside the branch taken when some row has a penalty, so a gather
    of per-slot statistics costs nothing in batches without penalties).
    The expensive parts are gated with ``lax.cond`` on per-row values, so an
    all-greedy batch without logprobs pays only for an argmax and a logsumexp:
    penalties (when any row has one), the random draw (when any row samples;
    truncation works on ``candidates`` tokens per row chosen by ``select``, see
    engine/truncation.py), top-n alternatives (when any row wants logprobs;
    otherwise they are returned as zeros / -inf).
    """
    B = logits.shape[0]
    if penalties is None:
        pen = logits
    else:
        get = penalties if callable(penalties) else (lambda: penalties)
        pen = jax.lax.cond(any_penalty(sb), lambda l: apply_penalties(l, sb, get()), lambda l: l, logits)
    greedy_tok = jnp.argmax(pen, axis=-1).astype(jnp.int32)
    draw = functools.partial(_draw, candidates=candidates, select=select, compaction_impl=compaction_impl)
    drawn = jax.lax.cond(jnp.any(sb.temperature > 0), draw, lambda l, _: greedy_tok, pen, sb)
    tokens = jnp.where(sb.temperature > 0, drawn, greedy_tok)
    lse = jax.nn.logsumexp(logits, axis=-1)
    lp = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse
    top_lp, top_ids = jax.lax.cond(
        jnp.any(sb.num_logprobs > 0), lambda: _top_logprobs(logits - lse[:, None]),
        lambda: (jnp.full((B, MAX_LOGPROBS), -jnp.inf, jnp.float32), jnp.zeros((B, MAX_LOGPROBS), jnp.int32)))
    hit_stop = jnp.any(tokens[:, None] == sb.stop_ids, axis=-1)
    return tokens, lp, top_ids, top_lp, hit_stop

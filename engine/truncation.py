"""Top-k / top-p / min-p truncation and the random draw, over a small candidate set.

Semantics, per row, on ``x = logits / temperature`` with tokens in descending
order of x (ties: lower id first). Rank r is kept iff
  * r < top_k                                   (when 0 < top_k < V),
  * the probability mass strictly before r < top_p (probabilities renormalised
    over the top-k when top-k is on),
  * x_r - x_0 >= log(min_p), i.e. p_r >= min_p * p_0   (when min_p > 0);
rank 0 always stays. Each test is monotone in r, so the kept set is a prefix.
The draw is inverse-CDF with one uniform ``u`` per row: the first kept rank
whose cumulative kept mass exceeds ``u`` times the total kept mass. Rows with
no truncation draw the same way over the whole vocabulary in id order.

Why candidates: sorting the whole vocabulary (49k to 128k) per row is the
expensive part of sampling (measured on the 2-core CPU at B=16, V=49152: the
former two-argsort filter took 310 ms a step), while the kept set of a
language model's distribution is nearly always a few hundred tokens. So each
row's best tokens are gathered into a candidate list of static length
``K`` (1024), sorted, cut and drawn from there. A row whose cut falls beyond
its candidates (a flat distribution) is redone with K = 8192, then on the full
sort, each tier under ``lax.cond``: a batch without such a row never pays for
it. On SmolLM2's logits at temperature 1 and top-p 0.9 the kept set was 15
tokens at the median, 223 at p90 and 3,409 at most (71 prompt positions,
benchmarks/results/sampling_cpu_2core.json). A row's
token does not depend on the path its batch took: rows whose cut lies inside
their candidates always take the K-length result.

Candidate selection (``select``):
* ``"top_k"``: ``lax.top_k(x, K)`` (a partial sort on XLA:CPU, 7 ms here);
* ``"compaction"``: a threshold ``t = max - D_j`` per row from the fixed ladder
  ``LADDER`` (one fused pass counts the tokens and mass above every rung; the
  lowest rung that holds the kept set in at most K tokens wins), then the
  positions with ``x >= t`` are compacted by ``kernels.compaction.nonzero``
  (the Pallas NonZero kernel on GPU) and only those are sorted. The rungs are
  coarse for flat rows: when no rung holds the kept set in at most K tokens, the
  threshold is bisected between the last rung that fits and the first that holds
  the kept set (``BISECT_STEPS`` passes, under ``lax.cond``: only when such a row
  exists). Without it, a SmolLM2 row at top-p 0.95 with a kept set of 6,437
  tokens fell through to the full sort (208 ms instead of 36). XLA's GPU
  TopK kernel is for small k (a large k becomes a sort), hence this path there;
* ``"sort"``: the full sort for every row (the baseline in benchmarks).
``"auto"`` is top_k on CPU, compaction elsewhere. On an H200 at batch 64 and
vocabulary 128,256, compaction took 0.60-1.58 ms against top_k's 1.43-2.67 and
the sort's 1.98-2.14 with a top-p, top-k or min-p filter, and about the same as
both without one (benchmarks/results/gpu/sampling_nvidia_h200.json;
``scripts/bench_sampling.py`` measures all three side by side).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Distances below the row maximum (logit units) tried as candidate thresholds.
LADDER = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0, 32.0, 64.0)
# Bisection steps between two rungs for rows that no rung fits (a flat distribution).
BISECT_STEPS = 12
SELECTS = ("auto", "top_k", "compaction", "sort")


def _rules(sb, V: int):
    topk_on = (sb.top_k > 0) & (sb.top_k < V)
    log_min_p = jnp.where(sb.min_p > 0, jnp.log(jnp.maximum(sb.min_p, 1e-30)), -jnp.inf)
    return topk_on, log_min_p


def truncates(sb, V: int):
    """bool[B]: rows that sample with top-k, top-p or min-p."""
    topk_on, _ = _rules(sb, V)
    return (sb.temperature > 0) & (topk_on | (sb.top_p < 1) | (sb.min_p > 0))


def _cut_and_draw(vals, ids, n_real, below, z_full, u, sb, V: int):
    """vals: f32[B, N] descending (padding -inf); ids: i32[B, N]; n_real: i32[B] real
    candidates (the rest is padding); below: f32[B] strict upper bound of the values left
    out (+inf: unknown); z_full: f32[B] sum of exp(x - max) over the row; u: f32[B].
    Returns (token i32[B], valid bool[B]: the kept set lies inside the candidates)."""
    N = vals.shape[1]
    topk_on, log_min_p = _rules(sb, V)
    rank = jnp.arange(N)[None, :]
    e = jnp.exp(vals - vals[:, :1])                                   # padding: 0
    in_k = (rank < n_real[:, None]) & jnp.where(topk_on[:, None], rank < sb.top_k[:, None], True)
    c = jnp.cumsum(jnp.where(in_k, e, 0.0), axis=-1)                  # inclusive cumulative mass
    before = jnp.concatenate([jnp.zeros_like(c[:, :1]), c[:, :-1]], axis=-1)
    z = jnp.where(topk_on, c[:, -1], z_full)
    keep = in_k & (before < sb.top_p[:, None] * z[:, None]) & (vals - vals[:, :1] >= log_min_p[:, None])
    keep = keep | (rank == 0)
    n_keep = jnp.sum(keep, axis=-1, dtype=jnp.int32)                  # a prefix
    # The first token left out must fail a test (each is monotone, so all later ones do too).
    next_out = ((n_keep < n_real) | (n_real >= V) | (topk_on & (sb.top_k <= n_real))
                | (c[:, -1] >= sb.top_p * z) | (below - vals[:, 0] <= log_min_p))
    valid = next_out & (~topk_on | (sb.top_k <= n_real))              # z needs the whole top-k
    w = jnp.take_along_axis(c, (n_keep - 1)[:, None], axis=-1)        # total kept mass
    r = jnp.sum((c <= u[:, None] * w) & (rank < n_keep[:, None]), axis=-1, dtype=jnp.int32)
    r = jnp.minimum(r, n_keep - 1)
    return jnp.take_along_axis(ids, r[:, None], axis=-1)[:, 0], valid


def _sorted_all(x):
    B, V = x.shape
    neg, ids = jax.lax.sort((-x, jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), (B, V))),
                            dimension=1, num_keys=1, is_stable=True)
    return -neg, ids


def _candidates_top_k(x, K: int):
    vals, ids = jax.lax.top_k(x, K)                                   # ties: lower id first
    # The barrier keeps XLA:CPU's TopK custom call: fused into its consumers, top_k was
    # rewritten into a full sort of the row (measured 145 ms instead of 7 ms at B=16).
    # One barrier per output: a barrier over the pair is simplified into a barrier on the TopK
    # tuple itself, which crashes XLA:CPU's TopkDecomposer in SPMD-partitioned programs.
    vals, ids = jax.lax.optimization_barrier(vals), jax.lax.optimization_barrier(ids)
    B = x.shape[0]
    return vals, ids.astype(jnp.int32), jnp.full((B,), K, jnp.int32), jnp.full((B,), jnp.inf)


def _threshold(x, e, z_full, sb, K: int):
    """Per-row candidate threshold t: f32[B] with at most K tokens >= t that hold the kept
    set (+inf where none was found: the row takes the next tier)."""
    B, V = x.shape
    m = jnp.max(x, axis=-1)
    topk_on, log_min_p = _rules(sb, V)

    def measure(d):                                                   # d: f32[B, J] distances below m
        above = x[:, :, None] >= (m[:, None] - d)[:, None, :]         # [B, V, J], fused into the sums
        count = jnp.sum(above, axis=1, dtype=jnp.int32)
        mass = jnp.sum(jnp.where(above, e[:, :, None], 0.0), axis=1)
        enough = jnp.where(topk_on[:, None], count >= sb.top_k[:, None], mass >= sb.top_p[:, None] * z_full[:, None])
        return count, enough | (d >= -log_min_p[:, None])             # all below m - d fail min-p

    d = jnp.broadcast_to(jnp.asarray(LADDER, jnp.float32), (B, len(LADDER)))
    count, enough = measure(d)
    ok = enough & (count <= K)
    found = jnp.any(ok, axis=-1)
    d_best = jnp.where(found, jnp.take_along_axis(d, jnp.argmax(ok, axis=-1)[:, None], -1)[:, 0], jnp.nan)

    def bisect():
        # Between the last rung that fits (too little) and the first that is enough (too many).
        lo = jnp.max(jnp.where(count <= K, d, 0.0), axis=-1)
        hi = jnp.min(jnp.where(enough, d, jnp.inf), axis=-1)
        hi = jnp.where(jnp.isinf(hi), 2.0 * LADDER[-1], hi)

        def body(_, c):
            lo, hi, best = c
            mid = 0.5 * (lo + hi)
            cnt, enu = measure(mid[:, None])
            cnt, enu = cnt[:, 0], enu[:, 0]
            best = jnp.where(jnp.isnan(best) & enu & (cnt <= K), mid, best)
            return jnp.where(enu, lo, mid), jnp.where(enu, mid, hi), best

        return jax.lax.fori_loop(0, BISECT_STEPS, body, (lo, hi, d_best))[2]

    d_best = jax.lax.cond(jnp.any(~found & truncates(sb, V)), bisect, lambda: d_best)
    return jnp.where(jnp.isnan(d_best), jnp.inf, m - d_best)


def _candidates_compaction(x, e, z_full, sb, K: int, compaction_impl: str):
    from ferry.kernels.compaction import nonzero
    B, V = x.shape
    t = _threshold(x, e, z_full, sb, K)
    mask = x >= t[:, None]
    n_row = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    (row, col), total = nonzero(mask, size=B * K, impl=compaction_impl)   # row-major: rows in order
    pos = jnp.arange(B * K, dtype=jnp.int32)
    offset = jnp.cumsum(n_row) - n_row
    slot = pos - offset[jnp.maximum(row, 0)]
    row = jnp.where(pos < total, row, B)                              # B: dropped
    ids = jnp.full((B, K), -1, jnp.int32).at[row, slot].set(col, mode="drop")
    vals = jnp.where(ids >= 0, jnp.take_along_axis(x, jnp.maximum(ids, 0), axis=-1), -jnp.inf)
    neg, ids = jax.lax.sort((-vals, ids), dimension=1, num_keys=1, is_stable=True)
    return -neg, ids, n_row, t                                        # left out: x < t


def draw_truncated(x, u, sb, *, candidates: tuple[int, ...] = (1024, 8192), select: str = "auto",
                   compaction_impl: str = "auto"):
    """x: f32[B, V] temperature-scaled logits; u: f32[B] uniforms. Returns i32[B]
    (meaningful on rows where ``truncates(sb, V)``).

    ``candidates``: candidate-list lengths tried in turn; a row takes the first
    length that holds its kept set, and the full sort when none does. Each later
    tier runs under ``lax.cond``, only when some row still needs it.
    """
    B, V = x.shape
    if select == "auto":
        select = "top_k" if jax.default_backend() == "cpu" else "compaction"
    if select not in SELECTS:
        raise ValueError(f"unknown sampling select {select!r}; one of {SELECTS}")
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    z_full = jnp.sum(e, axis=-1)
    tiers = () if select == "sort" else tuple(k for k in sorted(set(candidates)) if k < V)
    trunc = truncates(sb, V)

    def tier(i: int):
        if i == len(tiers):
            vals, ids = _sorted_all(x)
            return _cut_and_draw(vals, ids, jnp.full((B,), V, jnp.int32), jnp.full((B,), jnp.inf), z_full,
                                 u, sb, V)[0]
        if select == "top_k":
            vals, ids, n_real, below = _candidates_top_k(x, tiers[i])
        else:
            vals, ids, n_real, below = _candidates_compaction(x, e, z_full, sb, tiers[i], compaction_impl)
        tok, valid = _cut_and_draw(vals, ids, n_real, below, z_full, u, sb, V)
        rest = jax.lax.cond(jnp.any(trunc & ~valid), lambda: tier(i + 1), lambda: tok)
        return jnp.where(valid, tok, rest)

    return tier(0)


def draw_plain(x, u):
    """Sampling with no truncation: inverse CDF over the vocabulary in id order. x: f32[B, V]."""
    c = jnp.cumsum(jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)), axis=-1)
    r = jnp.sum(c <= u[:, None] * c[:, -1:], axis=-1, dtype=jnp.int32)
    return jnp.minimum(r, x.shape[1] - 1)

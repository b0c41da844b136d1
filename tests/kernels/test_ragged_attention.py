"""Ragged paged attention (kernels/ragged_attention.py) against a per-token oracle, on fresh random
inputs: decode rows and prefill chunks of several requests in one token array, with soft-cap and
sliding window, pages shuffled and stale data in unused slots."""
import dataclasses

import jax
import numpy as np
import jax.numpy as jnp
import pytest

from ferry.kernels.ragged_attention import RaggedLayout, by_context, ragged_attention_naive, ragged_paged_attention

S, P, L, Hkv, G, Dh = 4, 12, 2, 2, 3, 8


def _pack(rng, rows, q_block=4, extra_blocks=2, pad_tokens=3):
    """Token array with rows in a random order (each row's tokens contiguous) and padding between."""
    Hq = Hkv * G
    num_pages = 1 + len(rows) * P
    k_cache = rng.standard_normal((L, Hkv, num_pages, S, Dh)).astype(np.float32)
    v_cache = rng.standard_normal((L, Hkv, num_pages, S, Dh)).astype(np.float32)
    perm = rng.permutation(np.arange(1, num_pages))
    T = sum(n for _, n in rows) + pad_tokens
    positions = np.full(T, -1, np.int32)
    token_table = np.zeros((T, P), np.int32)
    singles, blocks = [], []
    gaps = sorted(rng.integers(0, len(rows) + 1, pad_tokens).tolist())
    t, g = 0, 0
    for r in rng.permutation(len(rows)):
        while g < len(gaps) and gaps[g] <= r:
            t, g = t + 1, g + 1
        start, n = rows[r]
        table = perm[r * P:(r + 1) * P].astype(np.int32)
        positions[t:t + n] = np.arange(start, start + n)
        token_table[t:t + n] = table
        if n == 1:
            singles.append((t, table, start + 1))
        else:
            blocks += [(t + b, min(q_block, n - b), table) for b in range(0, n, q_block)]
        t += n
    q = rng.standard_normal((T, Hq, Dh)).astype(np.float32)
    singles.append((-1, np.zeros(P, np.int32), 0))
    blocks += [(-1, 0, np.zeros(P, np.int32))] * extra_blocks
    lay = RaggedLayout(
        jnp.asarray(np.array([s[0] for s in singles], np.int32)), jnp.asarray(np.stack([s[1] for s in singles])),
        jnp.asarray(np.array([s[2] for s in singles], np.int32)),
        jnp.asarray(np.array([b[0] for b in blocks], np.int32)), jnp.asarray(np.array([b[1] for b in blocks], np.int32)),
        jnp.asarray(np.stack([b[2] for b in blocks])), q_block=q_block)
    return q, k_cache, v_cache, positions, token_table, lay


def _compare(case, layer, impl, soft_cap, window, tol):
    """The ragged kernel (``impl``) against the per-token oracle on one packed case."""
    q, kc, vc, pos, table, lay = (jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in case)
    got = ragged_paged_attention(q, kc, vc, layer, pos, lay, scale=0.3, soft_cap=soft_cap, window=window, impl=impl)
    want = ragged_attention_naive(q, kc, vc, layer, pos, table, scale=0.3, soft_cap=soft_cap, window=window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)
    assert np.all(np.asarray(got)[np.asarray(pos) < 0] == 0)    # padding tokens: output 0


@pytest.mark.parametrize("soft_cap,window", [(None, None), (5.0, None), (None, 7), (3.0, 5)])
def test_ragged_matches_per_token_oracle(soft_cap, window):
    rng = np.random.default_rng()
    rows = [(int(rng.integers(0, 30)), 1) for _ in range(3)] + [(0, 9), (int(rng.integers(1, 20)), 6), (5, 2)]
    case = _pack(rng, rows)
    for layer in range(L):
        _compare(case, layer, "reference", soft_cap, window, 1e-5)


BUCKETS = (2, 5, 12)    # context buckets in pages: 8, 20 and 48 tokens


def test_by_context_picks_the_smallest_bucket_that_holds_the_keys():
    tables = jnp.zeros((3, P), jnp.int32)
    width = jax.jit(lambda need: by_context(lambda t: jnp.asarray(t.shape[1]), tables, need, BUCKETS, S))
    assert [int(width(n)) for n in (0, 1, 8, 9, 20, 21, 48)] == [2, 2, 2, 5, 5, 12, 12]
    assert by_context(lambda t: t.shape[1], tables, 3, (), S) == P        # no buckets: the whole table


@pytest.mark.parametrize("longest", [6, 18, 40])
def test_context_buckets_inside_one_program_match_the_oracle(longest):
    """One jitted program with the buckets as switch branches, rows whose longest context falls in
    each bucket in turn (decode rows and chunks, with a window): the same output as the oracle."""
    rng = np.random.default_rng()
    rows = [(int(rng.integers(0, longest)), 1), (longest - 1, 1), (int(rng.integers(0, longest - 4)), 3),
            (max(0, longest - 5), 5)]
    q, kc, vc, pos, table, lay = _pack(rng, rows)
    lay = dataclasses.replace(lay, context_pages=BUCKETS)
    for window in (None, 5):
        run = jax.jit(lambda q, kc, vc, pos, lay: ragged_paged_attention(q, kc, vc, 1, pos, lay, scale=0.3,
                                                                          window=window, impl="reference"))
        got = run(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), jnp.asarray(pos), lay)
        want = ragged_attention_naive(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), 1, jnp.asarray(pos),
                                      jnp.asarray(table), scale=0.3, window=window)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_context_bucket_too_small_is_noticed():
    """Positive control: a bucket table whose only branch is narrower than the rows' context drops keys."""
    rng = np.random.default_rng()
    q, kc, vc, pos, table, lay = _pack(rng, [(30, 1), (20, 6)])
    narrow = dataclasses.replace(lay, context_pages=(2,))
    args = (jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), 0, jnp.asarray(pos))
    got = ragged_paged_attention(*args, narrow, scale=0.3, impl="reference")
    want = ragged_attention_naive(*args, jnp.asarray(table), scale=0.3)
    assert not np.allclose(np.asarray(got), np.asarray(want), atol=1e-3)


def test_oracle_positive_control():
    """The oracle notices a wrong layout: one block's table pointing at another row's pages."""
    rng = np.random.default_rng()
    q, kc, vc, pos, table, lay = _pack(rng, [(3, 5), (10, 6)], extra_blocks=0, pad_tokens=0)
    bad = RaggedLayout(lay.single_token, lay.single_tables, lay.single_lens, lay.block_start, lay.block_len,
                       lay.block_tables[::-1], q_block=lay.q_block)
    got = ragged_paged_attention(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), 0, jnp.asarray(pos), bad,
                                 scale=0.3, impl="reference")
    want = ragged_attention_naive(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), 0, jnp.asarray(pos),
                                  jnp.asarray(table), scale=0.3)
    assert not np.allclose(np.asarray(got), np.asarray(want), atol=1e-3)


def test_decode_layout_is_paged_attention():
    """``RaggedLayout.decode``: token i is row i (the decode program's layout)."""
    rng = np.random.default_rng()
    B = 5
    kc = rng.standard_normal((L, Hkv, 1 + B * P, S, Dh)).astype(np.float32)
    vc = rng.standard_normal((L, Hkv, 1 + B * P, S, Dh)).astype(np.float32)
    tables = rng.permutation(np.arange(1, 1 + B * P)).reshape(B, P).astype(np.int32)
    lens = rng.integers(1, P * S, B).astype(np.int32)
    lens[-1] = 0                                                  # a padding row
    q = rng.standard_normal((B, Hkv * G, Dh)).astype(np.float32)
    got = ragged_paged_attention(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), 1, jnp.asarray(lens - 1),
                                 RaggedLayout.decode(jnp.asarray(tables), jnp.asarray(lens)), scale=0.5,
                                 impl="reference")
    want = ragged_attention_naive(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), 1, jnp.asarray(lens - 1),
                                  jnp.asarray(tables), scale=0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("soft_cap,window", [(None, None), (3.0, 5)])
def test_ragged_pallas_interpret_matches_per_token_oracle(soft_cap, window):
    """impl="pallas" (both kernels in Pallas interpret mode: the decode kernel for one-token rows, the
    prefill kernel vmapped over query blocks) against the per-token oracle."""
    rng = np.random.default_rng()
    rows = [(int(rng.integers(0, 30)), 1) for _ in range(2)] + [(int(rng.integers(1, 20)), 6), (5, 2)]
    case = _pack(rng, rows, extra_blocks=1, pad_tokens=2)
    _compare(case, int(rng.integers(0, L)), "pallas", soft_cap, window, 2e-5)

"""On-device sampling: greedy, seeded reproducibility, top-k / top-p / min-p masks, penalties, stops."""
import jax
import jax.numpy as jnp
import numpy as np

from engine.sampling import SamplingBatch, _filter, host_rows, sample
from engine.sampling_params import SamplingParams

V = 50


def _batch(rows, H=16):
    return SamplingBatch(**{k: jnp.asarray(v) for k, v in host_rows(rows, len(rows), H).items()})


def _row(p, seed=0, step=0, toks=(), n_prompt=0, stops=()):
    return (p, seed, step, list(toks), n_prompt, tuple(stops))


def test_greedy_is_argmax_and_stop_detected():
    lg = jnp.asarray(np.random.default_rng(1).normal(size=(3, V)), jnp.float32)
    am = np.asarray(jnp.argmax(lg, -1))
    sb = _batch([_row(SamplingParams(temperature=0, logprobs=3)),
                 _row(SamplingParams(temperature=0), stops=(int(am[1]),)),
                 _row(SamplingParams(temperature=0), stops=(int(am[2]) + 1,))])
    tok, lp, top_ids, top_lp, hit = sample(lg, sb)
    np.testing.assert_array_equal(np.asarray(tok), am)
    np.testing.assert_array_equal(np.asarray(hit), [False, True, False])
    np.testing.assert_allclose(np.asarray(lp), np.asarray(jax.nn.log_softmax(lg)[jnp.arange(3), am]), rtol=1e-6)
    assert np.all(np.asarray(top_ids)[:, 0] == am)            # one row wants logprobs: computed for all
    np.testing.assert_allclose(np.asarray(top_lp)[:, 0], np.asarray(lp), rtol=1e-6)
    # nobody wants logprobs: the top-n pass is skipped
    _, _, _, top_lp2, _ = sample(lg, _batch([_row(SamplingParams(temperature=0))] * 3))
    assert np.all(np.isneginf(np.asarray(top_lp2)))


def test_seeded_sampling_reproducible_and_batch_independent():
    rng = np.random.default_rng()
    lg = jnp.asarray(rng.normal(size=(4, V)), jnp.float32)
    p = SamplingParams(temperature=1.0, seed=123)
    a = sample(lg, _batch([_row(p, 123, s) for s in range(4)]))[0]
    # same row alone, and next to other rows: same token
    for i in range(4):
        alone = sample(lg[i:i + 1], _batch([_row(p, 123, i)]))[0]
        assert int(alone[0]) == int(a[i])
    draws = {int(sample(lg[:1], _batch([_row(p, 123 + k, 0)]))[0][0]) for k in range(40)}
    assert len(draws) > 3     # different seeds do differ


def test_topk_topp_minp_masks():
    x = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)] * 3, jnp.float32))
    sb = _batch([_row(SamplingParams(temperature=1.0, top_k=2)), _row(SamplingParams(temperature=1.0, top_p=0.7)),
                 _row(SamplingParams(temperature=1.0, min_p=0.2))])
    kept = np.isfinite(np.asarray(_filter(x, sb)))
    assert kept[0].nonzero()[0].tolist() == [0, 1]          # top-2
    assert kept[1].nonzero()[0].tolist() == [0, 1]          # 0.5 < 0.7 -> keep second, stop after
    assert kept[2].nonzero()[0].tolist() == [0, 1, 2]       # >= 0.2 * 0.5
    toks = set()
    for s in range(30):
        toks.add(int(sample(x[:1], _batch([_row(SamplingParams(temperature=1.0, top_k=2), s)]))[0][0]))
    assert toks <= {0, 1} and len(toks) == 2


def test_penalties():
    lg = jnp.zeros((1, V), jnp.float32).at[0, 3].set(2.0).at[0, 4].set(1.9)
    # token 3 generated twice: frequency penalty 0.1*2 + presence 0 pushes it below token 4
    p = SamplingParams(temperature=0, frequency_penalty=0.1)
    tok = sample(lg, _batch([_row(p, toks=[9, 3, 3], n_prompt=1)]))[0]
    assert int(tok[0]) == 4
    # the same tokens in the prompt are not output tokens: no frequency penalty
    tok = sample(lg, _batch([_row(p, toks=[3, 3, 9], n_prompt=2)]))[0]
    assert int(tok[0]) == 3
    # repetition penalty covers prompt tokens too: 2.0 / 1.1 < 1.9
    p = SamplingParams(temperature=0, repetition_penalty=1.1)
    tok = sample(lg, _batch([_row(p, toks=[3], n_prompt=1)]))[0]
    assert int(tok[0]) == 4

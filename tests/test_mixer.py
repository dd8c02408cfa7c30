"""The Hedge mixer: fast vectorized path against the step-by-step reference, running counts, discounting."""
import time

import numpy as np
import pytest

from qpack.eval.mixer import (MixerConfig, NgramExpert, OnlineMixer, discounted_past_sum, hedge_weights, mix_nll,
                              ngram_probs, running_count, running_group_sum)


def test_running_count_and_group_sum_match_loops():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 7, 300)
    vals = rng.integers(0, 3, 300)
    want_c = [int(np.sum(keys[:i] == keys[i])) for i in range(300)]
    want_s = [int(np.sum(vals[:i][keys[:i] == keys[i]])) for i in range(300)]
    assert running_count(keys).tolist() == want_c
    assert running_group_sum(keys, vals).tolist() == want_s


@pytest.mark.parametrize("orders", [(1,), (1, 2, 3), (2, 4), (1, 2, 3, 5)])
def test_fast_ngram_probs_equal_reference_experts(orders):
    rng = np.random.default_rng(len(orders))
    V = 6
    tokens = rng.integers(0, V, 250)
    tokens[::17] = 1  # some structure so higher orders see repeats
    fast = ngram_probs(tokens, V, orders)
    experts = [NgramExpert(n, V) for n in orders]
    for e in experts:
        e.start(tokens[:1])
    for i, tok in enumerate(tokens[1:]):
        for k, e in enumerate(experts):
            d = e.distribution()
            assert abs(d.sum() - 1) < 1e-12
            assert fast[i, k] == pytest.approx(d[tok], rel=1e-12)
            e.observe(tok)


def test_witten_bell_by_hand():
    # stream 0 | 1 1 1 0 over V=4, unigram; before target 3 (token 0): counts {1: 2}... after three 1s: {1: 3}
    probs = ngram_probs(np.array([0, 1, 1, 1, 0]), 4, (1,))[:, 0]
    # t=0: nothing seen -> uniform 1/4; t=1: c(1)=1, d=1 -> (1 + 1/4) / 2; t=2: (2 + 1/4) / 3; t=3: token 0 unseen -> (0 + 1/4) / 4
    assert probs.tolist() == pytest.approx([0.25, 1.25 / 2, 2.25 / 3, 0.25 / 4])


@pytest.mark.parametrize("decay", [1.0, 0.99, 0.9, 0.5])
def test_discounted_past_sum_matches_recurrence(decay):
    rng = np.random.default_rng(1)
    losses = rng.exponential(3.0, size=(9000, 3))
    got = discounted_past_sum(losses, decay)
    want = np.zeros_like(losses)
    acc = np.zeros(3)
    for i in range(losses.shape[0]):
        want[i] = acc
        acc = decay * acc + losses[i]
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("decay", [1.0, 0.95])
def test_mix_nll_equals_online_mixer(decay):
    rng = np.random.default_rng(2)
    V, n = 5, 120
    tokens = rng.integers(0, V, n + 1)
    model_dists = rng.dirichlet(np.ones(V), size=n)
    model_nll = -np.log(model_dists[np.arange(n), tokens[1:]])
    cfg = MixerConfig(orders=(1, 2, 3), eta=0.7, decay=decay)
    fast = mix_nll(model_nll, tokens, V, cfg)
    experts = [NgramExpert(o, V) for o in cfg.orders]
    for e in experts:
        e.start(tokens[:1])
    ref = OnlineMixer(experts, eta=cfg.eta, decay=cfg.decay)
    for i in range(n):
        mix, dists = ref.step(model_dists[i])
        assert abs(mix.sum() - 1) < 1e-12
        assert fast.nll[i] == pytest.approx(-np.log(mix[tokens[i + 1]]), rel=1e-10)
        ref.update(tokens[i + 1])
    np.testing.assert_allclose(fast.final_weights, ref.weights(), rtol=1e-10)


def test_hedge_concentrates_on_the_better_expert():
    losses = np.column_stack([np.full(200, 1.0), np.full(200, 2.0)])
    w = hedge_weights(losses, eta=1.0)
    assert w[0].tolist() == [0.5, 0.5]
    assert w[10, 0] == pytest.approx(1 / (1 + np.exp(-10)))


def test_mixer_helps_a_weak_model_on_repetitive_text():
    V = 64
    rng = np.random.default_rng(3)
    phrase = rng.integers(0, V, 20)
    tokens = np.tile(phrase, 50)
    uniform_nll = np.full(tokens.size - 1, np.log(V))
    res = mix_nll(uniform_nll, tokens, V, MixerConfig(orders=(1, 2, 3), eta=1.0, decay=1.0))
    assert res.nll.mean() < 0.3 * np.log(V)
    assert res.expert_names == ["model", "unigram", "bigram", "trigram"]
    assert res.final_weights[0] < 1e-6  # the uniform model lost
    short_memory = mix_nll(uniform_nll, tokens, V, MixerConfig())  # the defaults
    assert short_memory.expert_names == ["model", "bigram", "trigram", "4-gram", "5-gram", "6-gram"]
    assert short_memory.nll.mean() < 0.3 * np.log(V)


def test_mixer_is_fast_on_100k_tokens():
    rng = np.random.default_rng(4)
    V = 1024
    tokens = rng.zipf(1.3, 100_001) % V
    nll = rng.exponential(4.0, 100_000)
    t0 = time.perf_counter()
    res = mix_nll(nll, tokens, V, MixerConfig(orders=(1, 2, 3, 4), decay=0.999))
    assert time.perf_counter() - t0 < 10.0
    assert np.all(np.isfinite(res.nll))


def test_bad_configs_raise():
    for kw in ({"orders": ()}, {"orders": (0,)}, {"orders": (2, 2)}, {"eta": 0}, {"decay": 0}, {"decay": 1.5}):
        with pytest.raises(ValueError):
            MixerConfig(**kw)
    with pytest.raises(ValueError):
        mix_nll(np.zeros(3), np.arange(5), 8)

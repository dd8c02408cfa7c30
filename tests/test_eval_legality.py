"""The challenge's legality rules, checked on sliding eval, the Hedge mixer and score-first TTT.

Rules: (causal) the score of token t does not change when any later token changes; (blind to its target) the
probability given to target t comes from a distribution that does not depend on target t itself: summed over
every value target t could take, it is 1; (normalized) every distribution sums to 1 within 1e-6; (score-first)
no update reads a token before it is scored; every token is scored exactly once. The checks run on the
production paths (`sliding_nll`, `mix_nll`, `ttt_nll`) and on deliberately leaky variants, to prove they can fail.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qpack.eval.mixer import MixerConfig, NgramExpert, OnlineMixer, hedge_weights, mix_nll, ngram_probs
from qpack.eval.sliding import plan_windows, sliding_nll, window_logprobs
from qpack.eval.ttt import EventLog, TTTConfig, _make_opt, plan_chunks, select_params, train_chunk, ttt_nll

V = 12
W, S = 16, 8
CAUSAL_TOL = 1e-7  # scores are recomputed in fp32; a leak moves them by orders of magnitude more


class TinyLM(nn.Module):
    def __init__(self, causal=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.causal = causal
        self.emb = nn.Embedding(V, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 48)])
        self.head = nn.Linear(16, V)

    def forward(self, idx):
        x = self.emb(idx)
        q, k, v = self.blocks[0](x).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=self.causal)[:, 0]
        return self.head(x + y)


def stream(n=97, seed=0):
    rng = np.random.default_rng(seed)
    t = np.tile(rng.integers(2, V, 9), n // 9 + 1)[:n]
    noise = rng.random(n) < 0.2  # repeats for the n-grams, noise so nothing is trivial
    t[noise] = rng.integers(0, V, int(noise.sum()))
    t[0] = 1
    return t


# ---- the checks ---------------------------------------------------------------------------------------------------

def causal_violations(score_fn, tokens, cuts, seed=0):
    """Targets t <= k whose score moved when every token after target k (token indices >= k + 2) was changed."""
    rng = np.random.default_rng(seed)
    base = score_fn(tokens)
    bad = []
    for k in cuts:
        t2 = tokens.copy()
        t2[k + 2:] = (t2[k + 2:] + rng.integers(1, V, t2.size - k - 2)) % V
        moved = np.flatnonzero(np.abs(score_fn(t2)[:k + 1] - base[:k + 1]) > CAUSAL_TOL)
        bad += [(k, int(i)) for i in moved]
    return bad


def target_mass_violations(score_fn, tokens, targets, tol=1e-5):
    """Targets k whose probability, summed over every value x of target k itself (token k + 1), is not 1.

    Each x is scored in a fresh call with only token k + 1 changed, so a score that reads its own target (as
    input, or counted before scoring) or an unnormalized mixture gives a sum away from 1.
    """
    bad = []
    for k in targets:
        mass = 0.0
        for x in range(V):
            t2 = tokens.copy()
            t2[k + 1] = x
            mass += float(np.exp(-score_fn(t2)[k]))
        if abs(mass - 1.0) > tol:
            bad.append((int(k), mass))
    return bad


def normalization_violations(dists):
    """Indices of distributions that are not nonnegative or do not sum to 1 within 1e-6."""
    return [i for i, d in enumerate(dists) if np.any(np.asarray(d) < 0) or abs(float(np.sum(d)) - 1.0) > 1e-6]


def score_first_violations(events, n_targets):
    """Updates that read an unscored target, targets scored twice, and targets never scored."""
    scored = np.zeros(n_targets, dtype=int)
    bad = []
    for kind, lo, hi in events:
        if kind == "score":
            if np.any(scored[lo:hi]):
                bad.append(("rescored", lo, hi))
            scored[lo:hi] += 1
        elif not np.all(scored[lo:hi]):
            bad.append(("update before score", lo, hi))
    if not np.all(scored == 1):
        bad.append(("not scored exactly once", int(np.sum(scored != 1)), n_targets))
    return bad


CUTS = [0, 5, 20, 40, 63, 90]
TARGETS = [0, 7, 8, 30, 64, 95]  # first target, both sides of a window edge (S = 8), mid-stream, the last


# ---- sliding ------------------------------------------------------------------------------------------------------

def test_sliding_is_causal_and_a_bidirectional_model_is_caught():
    tokens = stream()
    assert causal_violations(lambda t: sliding_nll(TinyLM(), t, W, S), tokens, CUTS) == []
    assert causal_violations(lambda t: sliding_nll(TinyLM(causal=False), t, W, S), tokens, CUTS) != []


def _sliding_feeding_the_target(tokens):
    """Leaky: each window's inputs are shifted one token on, so the output scoring target t has read target t."""
    tokens = np.asarray(tokens, dtype=np.int64)
    model, toks, out = TinyLM(), torch.as_tensor(tokens), np.zeros(tokens.size - 1)
    for w in plan_windows(tokens.size - 1, W, S):
        with torch.no_grad():
            logp = F.log_softmax(model(toks[w.start + 1:w.b + 1][None])[0, -(w.b - w.a):], dim=-1)
        out[w.a:w.b] = -logp[torch.arange(w.b - w.a), toks[w.a + 1:w.b + 1]].double().numpy()
    return out


def test_sliding_scores_each_target_blind_to_itself_and_feeding_the_target_is_caught():
    tokens = stream()
    assert target_mass_violations(lambda t: sliding_nll(TinyLM(), t, W, S), tokens, TARGETS) == []
    # the shifted variant is still causal in the usual sense (later tokens never move earlier scores) ...
    assert causal_violations(_sliding_feeding_the_target, tokens, CUTS) == []
    # ... only changing the scored token itself exposes it
    assert target_mass_violations(_sliding_feeding_the_target, tokens, TARGETS) != []


def test_sliding_scores_every_token_once():
    tokens = stream()
    log = EventLog()
    sliding_nll(TinyLM(), tokens, W, S, on_window=lambda w: log.scored(w.a, w.b))
    assert score_first_violations(log.events, tokens.size - 1) == []
    log.scored(10, 12)  # a window scored twice is caught
    assert score_first_violations(log.events, tokens.size - 1) != []


# ---- mixer --------------------------------------------------------------------------------------------------------

def _mixed(tokens):
    return mix_nll(sliding_nll(TinyLM(), tokens, W, S), tokens, V, MixerConfig(orders=(1, 2, 3), decay=0.98)).nll


def _mixed_with_peeking_expert(tokens):
    """Leaky: an extra expert predicts each target from the token after it (a reverse bigram over the whole stream)."""
    nll = sliding_nll(TinyLM(), tokens, W, S)
    pairs = np.zeros((V, V))
    np.add.at(pairs, (tokens[:-1], tokens[1:]), 1.0)
    x, nxt = tokens[1:], np.append(tokens[2:], 0)
    peek = (pairs[x, nxt] + 1.0) / (pairs[:, nxt].sum(axis=0) + V)  # normalized over x for each next token
    probs = np.column_stack([np.exp(-nll), ngram_probs(tokens, V, (1, 2)), peek])
    w = hedge_weights(-np.log(probs), 1.0)
    return -np.log((w * probs).sum(axis=1))


def test_mixer_is_causal_and_a_peeking_expert_is_caught():
    tokens = stream()
    assert causal_violations(_mixed, tokens, CUTS) == []
    assert causal_violations(_mixed_with_peeking_expert, tokens, CUTS) != []


def test_mix_nll_scores_each_target_blind_to_itself():
    tokens = stream()
    assert target_mass_violations(_mixed, tokens, TARGETS) == []


def test_a_mix_nll_counting_its_target_first_is_caught(monkeypatch):
    # the production fast path with inclusive running counts: each target is counted before it is scored
    from qpack.eval import mixer

    exclusive = mixer.running_count
    monkeypatch.setattr(mixer, "running_count", lambda keys: exclusive(keys) + 1)
    assert causal_violations(_mixed, stream(), CUTS) == []  # still causal: only the target itself leaks
    assert target_mass_violations(_mixed, stream(), TARGETS) != []


def test_a_mix_nll_with_unnormalized_hedge_weights_is_caught(monkeypatch):
    from qpack.eval import mixer

    monkeypatch.setattr(mixer, "hedge_weights", lambda losses, eta, decay=1.0: np.exp(
        -eta * mixer.discounted_past_sum(losses, decay)))
    assert target_mass_violations(_mixed, stream(), TARGETS) != []


def _model_dists(model, tokens):
    out = []
    for w, logp in window_logprobs(model, tokens, plan_windows(tokens.size - 1, W, S)):
        out += list(logp.double().exp().numpy())
    return out


def _run_online(tokens, model_dists, experts, leaky=False, log=None, at=()):
    """Step the reference mixer over the stream; collect the distributions at positions `at`."""
    for e in experts:
        e.start(tokens[:1])
    mixer = OnlineMixer(experts, eta=1.0, decay=0.98)
    seen = []
    for i in range(tokens.size - 1):
        if leaky:  # counts the token before it is scored
            for e in experts:
                e.observe(tokens[i + 1])
            if log is not None:
                log.trained(i, i + 1)
        mix, dists = mixer.step(model_dists[i])
        if log is not None:
            log.scored(i, i + 1)
        if i in at:
            seen += [mix] + list(dists)
        if leaky:
            mixer.loss = mixer.decay * mixer.loss - np.log(dists[:, tokens[i + 1]])
            mixer._last = None
        else:
            mixer.update(tokens[i + 1])
            if log is not None:
                log.trained(i, i + 1)
    return seen


class EntropyExpert:
    """Leaky, as parameter-golf PR #688: every token gets exp(-H) of the model's distribution (not normalized)."""

    def __init__(self):
        self.model_dist = None

    def distribution(self):
        p = self.model_dist
        return np.full(V, np.exp(-float(-(p * np.log(p)).sum())))

    def observe(self, token):
        pass

    def start(self, ctx):
        pass


def test_every_distribution_is_normalized_and_an_entropy_expert_is_caught():
    tokens = stream()
    dists = _model_dists(TinyLM(), tokens)
    at = set(np.random.default_rng(5).choice(tokens.size - 1, 12, replace=False).tolist())
    assert normalization_violations([dists[i] for i in sorted(at)]) == []
    seen = _run_online(tokens, dists, [NgramExpert(n, V) for n in (1, 2, 3, 4)], at=at)
    assert len(seen) == 12 * 6 and normalization_violations(seen) == []
    # leaky: the entropy expert reads the model's current distribution and hands every token exp(-H)
    ent = EntropyExpert()

    class Feed(list):
        def __getitem__(self, i):
            ent.model_dist = dists[i]
            return dists[i]

    seen = _run_online(tokens, Feed(dists), [NgramExpert(2, V), ent], at=at)
    bad = normalization_violations(seen)
    assert bad and all(k % 4 in (0, 3) for k in bad)  # the entropy expert and every mixture holding it


def test_mixer_counts_only_scored_tokens_and_a_count_first_mixer_is_caught():
    tokens = stream()
    dists = _model_dists(TinyLM(), tokens)
    log = EventLog()
    _run_online(tokens, dists, [NgramExpert(n, V) for n in (1, 2, 3)], log=log)
    assert score_first_violations(log.events, tokens.size - 1) == []
    log = EventLog()
    _run_online(tokens, dists, [NgramExpert(n, V) for n in (1, 2, 3)], leaky=True, log=log)
    assert score_first_violations(log.events, tokens.size - 1) != []


# ---- TTT ----------------------------------------------------------------------------------------------------------

CFG = TTTConfig(chunk=16, lr=0.05, epochs=2, params="all")


def _ttt_train_first(model, tokens, log=None):
    """Leaky: trains on each chunk before scoring it."""
    toks = torch.as_tensor(tokens)
    work = __import__("copy").deepcopy(model)
    params = select_params(work, CFG)
    opt = _make_opt(params, CFG)
    out = np.zeros(tokens.size - 1)
    for group in plan_chunks(plan_windows(tokens.size - 1, W, S), CFG.chunk):
        train_chunk(work, opt, params, toks, group[0].a, group[-1].b, W, CFG, torch.device("cpu"), log)
        for w, logp in window_logprobs(work, tokens, group, inference=False):
            out[w.a:w.b] = -logp[torch.arange(w.b - w.a), toks[w.a + 1:w.b + 1]].double().numpy()
            if log is not None:
                log.scored(w.a, w.b)
    return out


def test_ttt_is_causal_and_train_before_score_is_caught():
    tokens = stream()
    model = TinyLM()
    assert causal_violations(lambda t: ttt_nll(model, t, W, S, CFG), tokens, CUTS) == []
    assert causal_violations(lambda t: _ttt_train_first(model, t), tokens, CUTS) != []


def test_ttt_scores_each_target_blind_to_itself_and_train_before_score_is_caught():
    tokens, model = stream(), TinyLM()
    assert target_mass_violations(lambda t: ttt_nll(model, t, W, S, CFG), tokens, [20, 64]) == []
    assert target_mass_violations(lambda t: _ttt_train_first(model, t), tokens, [20, 64]) != []


def test_ttt_is_score_first_and_train_before_score_is_caught():
    tokens = stream()
    model = TinyLM()
    for cfg in (CFG, TTTConfig(chunk=10, lr=0.01, epochs=1, params="lora:2", optimizer="adamw", reset_on_bos=True)):
        log = EventLog()
        ttt_nll(model, tokens, W, S, cfg, log=log)
        assert any(k == "train" for k, _, _ in log.events)
        assert score_first_violations(log.events, tokens.size - 1) == []
    log = EventLog()
    _ttt_train_first(model, tokens, log)
    assert score_first_violations(log.events, tokens.size - 1) != []


# ---- the project's GPT, with each seed-record switch that mixes positions -------------------------------------------

@pytest.mark.parametrize("options", [{}, {"smear_gate": True, "bigram_buckets": 64}, {"xsa_last": 1, "value_residual": True},
                                     {"unet_skips": True, "recur_layers": (0,)}])
def test_the_gpt_is_causal_under_sliding_eval(options):
    import qpack.models.gpt as gpt
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=V, n_layer=2, n_embd=16, n_head=2, n_kv_head=1, bigram_dim=8, **options))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tokens = stream()
    assert causal_violations(lambda t: sliding_nll(model, t, W, S), tokens, CUTS) == []

"""Sliding-window scoring: the window plan, the context each token sees, and batching."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qpack.eval.sliding import check_window, plan_windows, sliding_nll, window_logprobs


class TinyLM(nn.Module):
    """A one-layer causal attention LM: enough to make context matter."""

    def __init__(self, vocab=16, dim=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0]
        return self.head(x + y)


class ContextLengthModel(nn.Module):
    """Logit of token 0 at position t is t (all others 0): the NLL of a 0 target reveals its context length."""

    def __init__(self, vocab=4):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx):
        b, t = idx.shape
        out = torch.zeros(b, t, self.vocab)
        out[:, :, 0] = torch.arange(t, dtype=torch.float32)
        return out


def nll_to_context(nll, vocab):
    # nll = log(e^p + V - 1) - p with p = context - 1; nearest entry of a table over small p (fp32 scores)
    table = np.array([math.log(math.exp(p) + vocab - 1) - p for p in range(0, 12)])
    out = []
    for x in nll:
        k = int(np.argmin(np.abs(table - x)))
        assert abs(table[k] - x) < 1e-5
        out.append(k + 1)
    return out


@pytest.mark.parametrize("n,W,S", [(1, 4, 2), (10, 4, 4), (37, 8, 3), (64, 16, 16), (5, 16, 4), (100, 7, 1)])
def test_every_target_scored_once_with_the_context_the_window_allows(n, W, S):
    windows = plan_windows(n, W, S)
    seen = np.zeros(n, dtype=int)
    for w in windows:
        assert w.length <= W and w.start >= 0
        seen[w.a:w.b] += 1
        for i in range(w.a, w.b):
            ctx = i + 1 - w.start  # tokens start..i
            assert ctx >= min(i + 1, W - S + 1)
    assert seen.tolist() == [1] * n
    assert windows[0].start == 0 and windows[0].b == min(n, W)


@pytest.mark.parametrize("W,S", [(8, 3), (8, 8), (5, 1)])
def test_context_lengths_read_back_from_the_scores(W, S):
    n = 40
    tokens = np.zeros(n + 1, dtype=np.int64)
    nll = sliding_nll(ContextLengthModel(), tokens, W, S, batch=3)
    got = nll_to_context(nll, 4)
    # independent of plan_windows: the first W targets see all history; after that a target sits in the chunk
    # ending at the next W + kS boundary (or at n), whose window reaches back W tokens
    want = []
    for i in range(n):
        if i < W:
            want.append(i + 1)
        else:
            end = min(n, W + S * math.ceil((i + 1 - W) / S))
            want.append(i + 1 - (end - W))
    assert got == want


def test_stride_equal_window_is_plain_chunked_eval():
    model = TinyLM()
    tokens = np.random.default_rng(0).integers(0, 16, 50)
    nll = sliding_nll(model, tokens, 8, 8, batch=2)
    want = []
    with torch.no_grad():
        for s in range(0, 48, 8):
            x = torch.as_tensor(tokens[s:s + 8])[None]
            y = torch.as_tensor(tokens[s + 1:s + 9])
            want.append(F.cross_entropy(model(x)[0], y, reduction="none"))
        # the one leftover target is scored at the end of a full window reaching back from it, not alone
        want.append(F.cross_entropy(model(torch.as_tensor(tokens[41:49])[None])[0, -1:], torch.as_tensor(tokens[49:50]),
                                    reduction="none"))
    np.testing.assert_allclose(nll, torch.cat(want).numpy(), rtol=1e-5, atol=1e-6)


def test_window_covering_the_stream_is_one_full_forward():
    model = TinyLM()
    tokens = np.random.default_rng(1).integers(0, 16, 30)
    nll = sliding_nll(model, tokens, 64, 16)
    with torch.no_grad():
        want = F.cross_entropy(model(torch.as_tensor(tokens[:-1])[None])[0], torch.as_tensor(tokens[1:]),
                               reduction="none")
    np.testing.assert_allclose(nll, want.numpy(), rtol=1e-5, atol=1e-6)


def test_batching_does_not_change_scores_and_distributions_are_normalized():
    model = TinyLM()
    tokens = np.random.default_rng(2).integers(0, 16, 90)
    a = sliding_nll(model, tokens, 12, 5, batch=1)
    b = sliding_nll(model, tokens, 12, 5, batch=7)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for w, logp in window_logprobs(model, tokens, plan_windows(89, 12, 5), batch=4):
        np.testing.assert_allclose(logp.exp().sum(-1).numpy(), 1.0, atol=1e-6)


def test_sub_range_scores_match_the_full_run_on_shared_windows():
    model = TinyLM()
    tokens = np.random.default_rng(3).integers(0, 16, 60)
    full = sliding_nll(model, tokens, 10, 5)
    part = sliding_nll(model, tokens, 10, 5, begin=20, end=35)
    np.testing.assert_allclose(part, full[20:35], rtol=1e-6, atol=1e-7)


def test_bad_windows_and_tokens_raise():
    for W, S in ((0, 1), (4, 0), (4, 5), (-1, -1)):
        with pytest.raises(ValueError):
            check_window(W, S)
    with pytest.raises(ValueError, match="vocabulary"):
        sliding_nll(TinyLM(vocab=4), np.array([0, 1, 9]), 4, 2)


@pytest.mark.parametrize("world", [2, 3])
def test_shards_partition_the_targets_and_reproduce_one_process(world):
    from qpack.eval.sliding import shard_targets

    tokens = np.random.default_rng(5).integers(0, 16, 300)
    model = TinyLM()
    windows = plan_windows(299, 40, 12)
    parts = [shard_targets(windows, 3, r, world) for r in range(world)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(299))  # every target on exactly one rank
    assert all(len(p) for p in parts)
    one = sliding_nll(model, tokens, 40, 12, batch=3)
    for r, idx in enumerate(parts):
        part = sliding_nll(model, tokens, 40, 12, batch=3, shard=(r, world))
        assert np.array_equal(part[idx], one[idx])  # the same batches, so the same bits
        others = np.setdiff1d(np.arange(299), idx)
        assert np.isnan(part[others]).all()  # and nothing else was scored

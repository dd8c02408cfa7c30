"""On a small GPT trained in the test: GPTQ beats round-to-nearest on held-out loss at (about) equal bytes,
and a budgeted compress of the trained model lands under each budget and within 2% of it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qpack
from qpack.calibrate import collect
from qpack.compress import CompressConfig, compress

from qpack.models.gpt import GPT, GPTConfig

VOCAB, SEQ = 96, 64


def _markov_tokens(n: int, seed: int) -> np.ndarray:
    """A first-order Markov source with peaked transitions: structure a small model learns in a few steps."""
    rng = np.random.default_rng(1234)
    table = rng.dirichlet(np.full(VOCAB, 0.05), size=VOCAB).cumsum(-1)
    g = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    out[0] = g.integers(0, VOCAB)
    u = g.random(n)
    for i in range(1, n):
        out[i] = min(int(np.searchsorted(table[out[i - 1]], u[i])), VOCAB - 1)
    return out


def _loss(model: torch.nn.Module, tokens: np.ndarray) -> float:
    x = torch.from_numpy(tokens[: (len(tokens) - 1) // SEQ * SEQ + 1])
    inp, tgt = x[:-1].view(-1, SEQ), x[1:].view(-1, SEQ)
    with torch.inference_mode():
        return float(F.cross_entropy(model(inp).reshape(-1, VOCAB), tgt.reshape(-1)))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, n_layer=2, n_embd=96, n_head=4, n_kv_head=2)
    model = GPT(cfg)
    train = _markov_tokens(30_000, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    t = torch.from_numpy(train)
    for step in range(150):
        idx = torch.randint(0, len(train) - SEQ - 1, (16,), generator=g)
        batch = torch.stack([t[i : i + SEQ + 1] for i in idx.tolist()])
        loss = F.cross_entropy(model(batch[:, :-1]).reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    held_out = _markov_tokens(20_000, seed=2)
    hessians = collect(model, train[:8192], SEQ, batch_size=8)
    return model, cfg, hessians, held_out


def _reload(cfg: GPTConfig, path) -> GPT:
    m = GPT(cfg)
    m.load_state_dict(qpack.load(path))
    return m.eval()


@pytest.mark.parametrize("bits", [4, 6])
def test_gptq_beats_rtn_on_held_out_loss(trained, tmp_path, bits):
    model, cfg, hessians, held_out = trained
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = _loss(model, held_out)
    out = {}
    for scheme, h in (("rtn", None), ("gptq", hessians)):
        path = tmp_path / f"{scheme}{bits}.qpk"
        res = compress(sd, path, CompressConfig(scheme=scheme, fixed_bits=bits, codecs=("ans",)), hessians=h)
        assert {t.scheme for t in res.tensors if t.scheme != "passthrough"} == {scheme}
        out[scheme] = (res.bytes_total, _loss(_reload(cfg, path), held_out))
    (b_rtn, l_rtn), (b_gptq, l_gptq) = out["rtn"], out["gptq"]
    assert abs(b_gptq - b_rtn) <= 0.03 * b_rtn, out  # same width, entropy-coded: equal bytes within 3%
    assert l_gptq < l_rtn, out
    # GPTQ recovers a clear share of what rounding loses.
    assert (l_gptq - base) < 0.9 * (l_rtn - base), (base, out)


def test_budgets_land_under_and_close(trained, tmp_path):
    model, cfg, hessians, held_out = trained
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses = []
    for budget in (40_000, 70_000, 120_000):
        path = tmp_path / f"b{budget}.qpk"
        res = compress(sd, path, CompressConfig(budget=budget, bits=(2, 3, 4, 5, 6, 8), codecs=("ans",), chunk_numel=8192), hessians=hessians)
        size = path.stat().st_size
        assert size == res.bytes_total <= budget
        assert size >= 0.98 * budget
        losses.append(_loss(_reload(cfg, path), held_out))
    # More bytes never hurt by more than noise, and the smallest budget is clearly the worst.
    assert losses[0] > losses[2] and losses[1] <= losses[0] + 1e-4

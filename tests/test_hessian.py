"""Hessian collection with forward hooks, tied embeddings, and calibration batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qpack.errors import QpackInputError
from qpack.hessian import calibration_batches, collect_hessians


class TinyLM(nn.Module):
    """Embedding -> block (two linears, one used twice) -> norm -> head, optionally tied."""

    def __init__(self, vocab=11, dim=6, tied=True):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight
        self.dropout = nn.Dropout(0.5)

    def forward(self, idx):
        x = self.tok(idx)
        for _ in range(2):  # `up` and `down` run twice per forward: both calls count
            x = x + self.down(torch.relu(self.up(self.dropout(x))))
        return self.head(self.norm(x))


def manual_hessians(model, batches):
    """X^T X / n per weight, by replaying the forward pass by hand (eval mode: no dropout)."""
    xs = {"up": [], "down": [], "head": []}
    with torch.no_grad():
        for idx in batches:
            x = model.tok(idx)
            for _ in range(2):
                xs["up"].append(x.reshape(-1, x.shape[-1]))
                h = torch.relu(model.up(x))
                xs["down"].append(h.reshape(-1, h.shape[-1]))
                x = x + model.down(h)
            n = model.norm(x)
            xs["head"].append(n.reshape(-1, n.shape[-1]))
    out = {}
    for k, v in xs.items():
        X = torch.cat(v).double()
        out[k] = X.T @ X / X.shape[0]
    return out


def batches(n=3, b=2, t=5, vocab=11):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (b, t), generator=g) for _ in range(n)]


def test_hessians_match_manual_and_tied_names():
    model = TinyLM(tied=True)
    model.train()
    data = batches()
    hs = collect_hessians(model, data)
    ref = manual_hessians(model, data)
    assert set(hs) == {"up.weight", "down.weight", "head.weight", "tok.weight"}
    torch.testing.assert_close(hs["up.weight"].double(), ref["up"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs["down.weight"].double(), ref["down"], rtol=1e-5, atol=1e-6)
    # The tied embedding gets the head's input Hessian (the final norm's output), under both names.
    torch.testing.assert_close(hs["head.weight"].double(), ref["head"], rtol=1e-5, atol=1e-6)
    assert hs["tok.weight"] is hs["head.weight"]
    assert hs["up.weight"].shape == (6, 6) and hs["down.weight"].shape == (12, 12)
    # Hooks are gone, the mode is restored, and nothing needed gradients.
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_untied_embedding_gets_no_hessian_and_float64():
    model = TinyLM(tied=False)
    data = batches()
    hs = collect_hessians(model, data, dtype=torch.float64)
    assert set(hs) == {"up.weight", "down.weight", "head.weight"}
    assert hs["up.weight"].dtype == torch.float64
    torch.testing.assert_close(hs["head.weight"], manual_hessians(model, data)["head"], rtol=1e-10, atol=1e-12)


def test_module_filter_by_predicate_and_names():
    model = TinyLM()
    only_up = collect_hessians(model, batches(), modules=lambda name, mod: name == "up")
    assert set(only_up) == {"up.weight"}
    by_names = collect_hessians(model, batches(), modules={"down", "head"})
    assert set(by_names) == {"down.weight", "head.weight", "tok.weight"}


def test_inputs_for_a_head_tied_through_functional_linear():
    class FunctionalHead(TinyLM):
        def forward(self, idx):
            x = self.tok(idx)
            return nn.functional.linear(self.norm(x), self.tok.weight)

    model = FunctionalHead(tied=False)
    data = batches()
    X = torch.cat([model.norm(model.tok(b)).reshape(-1, 6) for b in data]).detach().double()
    want = X.T @ X / X.shape[0]
    # Found automatically: tok.weight is passed to F.linear as the weight.
    auto = collect_hessians(model, data)
    assert set(auto) == {"tok.weight"}
    torch.testing.assert_close(auto["tok.weight"].double(), want, rtol=1e-5, atol=1e-6)
    # Or named by hand (no double counting with the automatic capture).
    hs = collect_hessians(model, data, inputs={"tok.weight": model.norm})
    torch.testing.assert_close(hs["tok.weight"].double(), want, rtol=1e-5, atol=1e-6)
    assert collect_hessians(model, data, modules=lambda n, m: n != "tok") == {}
    with pytest.raises(QpackInputError, match="no weight named"):
        collect_hessians(model, data, inputs={"missing.weight": model.norm})


def test_no_linear_is_an_error_and_hooks_are_removed_on_failure():
    with pytest.raises(QpackInputError, match="no nn.Linear"):
        collect_hessians(nn.Sequential(nn.ReLU()), [torch.zeros(1, 2)])

    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            self.lin(x)
            raise RuntimeError("boom")

    m = Boom()
    with pytest.raises(RuntimeError):
        collect_hessians(m, [torch.zeros(1, 2)])
    assert not m.lin._forward_hooks


def test_progress_bar_runs(capsys):
    hs = collect_hessians(TinyLM(), batches(), progress=True)
    assert "up.weight" in hs


def test_calibration_batches_deterministic_and_spread():
    tokens = np.arange(1000, dtype=np.uint16)
    out = calibration_batches(tokens, 320, 64, 2)
    assert [b.shape for b in out] == [(2, 64), (2, 64), (1, 64)]
    assert all(b.dtype == torch.int64 for b in out)
    rows = torch.cat(out).numpy()
    starts = rows[:, 0]
    # Five windows, evenly spread from the start to the end of the stream, each contiguous.
    assert list(starts) == [0, 234, 468, 702, 936]
    assert (np.diff(rows, axis=1) == 1).all()
    again = calibration_batches(tokens, 320, 64, 2)
    assert all(torch.equal(a, b) for a, b in zip(out, again))


def test_calibration_batches_limits():
    tokens = np.arange(100)
    all_of_it = calibration_batches(tokens, 10_000, 30, 8)
    assert len(all_of_it) == 1 and all_of_it[0].shape == (3, 30)
    rows = all_of_it[0].numpy()
    assert rows[0, 0] == 0 and rows[-1, -1] == 99 and len(np.unique(rows)) == 90  # no overlap
    one = calibration_batches(tokens, 5, 30, 8)
    assert one[0].shape == (1, 30)
    with pytest.raises(QpackInputError, match="at least"):
        calibration_batches(np.arange(10), 100, 30, 4)
    with pytest.raises(QpackInputError):
        calibration_batches(np.zeros((2, 50)), 100, 10, 4)
    with pytest.raises(QpackInputError):
        calibration_batches(tokens, 100, 0, 4)


def test_reference_gpt_gets_every_matrix_and_the_tied_head():
    import qpack.models.gpt as gpt
    cfg = gpt.GPTConfig(**{k: v for k, v in dict(vocab_size=32, n_layer=2, n_embd=16, n_head=2, n_kv_head=1,
                                                 tie_embeddings=True).items()
                           if k in gpt.GPTConfig.__dataclass_fields__})
    model = gpt.GPT(cfg)
    hs = collect_hessians(model, [torch.randint(0, 32, (2, 8))])
    mats = {k for k, v in model.state_dict().items() if v.ndim == 2 and k != "tok_emb.weight"}
    linears = {n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears <= set(hs) and "tok_emb.weight" in hs
    assert hs["tok_emb.weight"].shape == (16, 16)
    # The head's input is RMS-normalised: mean of x^2 per row is 1, so trace(H) = n_embd.
    assert float(torch.trace(hs["tok_emb.weight"])) == pytest.approx(16, rel=1e-3)
    assert mats - set(hs) <= {n for n in mats if "skip" in n or "emb" in n}


def test_hessian_sums_keep_unreached_weights_for_reduction():
    """The unnormalized form a distributed run all-reduces: every weight listed (n = 0 when unreached),
    in state-dict order, with sums that divide into collect_hessians' result."""
    from qpack.hessian import hessian_sums

    class Skips(TinyLM):
        def forward(self, idx):
            return self.head(self.norm(self.tok(idx)))  # up and down never run

    model = Skips(tied=False)
    data = batches()
    groups = hessian_sums(model, data)
    # tok.weight is watched as a possible F.linear weight (a hand-tied head) and never used as one
    assert [names for names, _, _ in groups] == [["tok.weight"], ["up.weight"], ["down.weight"], ["head.weight"]]
    counts = {names[0]: n for names, _, n in groups}
    assert counts == {"tok.weight": 0, "up.weight": 0, "down.weight": 0, "head.weight": 3 * 2 * 5}
    normalized = collect_hessians(model, data)
    assert set(normalized) == {"head.weight"}
    head = next(H for names, H, _ in groups if names == ["head.weight"])
    torch.testing.assert_close(head / 30, normalized["head.weight"])

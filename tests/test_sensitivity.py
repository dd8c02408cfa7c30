"""Diagonal Fisher sensitivity (qpack.sensitivity, qpack.calibrate.fisher) and the solver's fisher loss proxy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

from qpack.calibrate import fisher
from qpack.cli import main
from qpack.compress import CompressConfig, compress
from qpack.data.shards import write_shard
from qpack.errors import QpackInputError
from qpack.sensitivity import fisher_diagonal, model_loss
from qpack.forward import adapter_for


class LogitsLM(nn.Module):
    """model(idx) -> logits, untied."""

    def __init__(self, vocab: int = 23, width: int = 12):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.fc = nn.Linear(width, 2 * width)
        self.head = nn.Linear(2 * width, vocab, bias=False)

    def forward(self, idx):
        return self.head(torch.tanh(self.fc(self.emb(idx))))


class SeedLM(nn.Module):
    """The seeds' convention: forward(input_ids, target_ids) -> loss, head tied to the embedding."""

    def __init__(self, vocab: int = 19, width: int = 10):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, width)
        self.fc = nn.Linear(width, width)

    def forward(self, idx, targets):
        x = self.tok_emb(idx)
        x = x + torch.relu(self.fc(x))
        logits = F.linear(x, self.tok_emb.weight)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _per_row_fisher_func(model: nn.Module, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Independent reference: per-sample gradients with torch.func (vmap of grad), squared, averaged."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def row_loss(p, row):
        logits = functional_call(model, p, (row[None],))[0]
        return F.cross_entropy(logits[:-1], row[1:])  # next token inside the row

    g = vmap(grad(row_loss), in_dims=(None, 0))(params, rows)
    return {k: v.square().mean(0) for k, v in g.items()}


def test_fisher_matches_per_sample_gradients_by_torch_func():
    torch.manual_seed(0)
    model = LogitsLM()
    seq, n_rows = 9, 6
    stream = torch.randint(0, 23, (seq * n_rows,))
    # a stream of exactly n_rows * seq tokens is cut into its consecutive rows, one row per backward
    got = fisher(model, stream.numpy(), seq_len=seq)
    want = _per_row_fisher_func(model, stream.reshape(n_rows, seq))
    assert set(got) == {"emb.weight", "fc.weight", "head.weight"}  # matrices only: biases are not quantized
    for k in got:
        assert got[k].dtype == torch.float32 and got[k].shape == want[k].shape
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-9)
        assert float(want[k].sum()) > 0


def test_fisher_of_a_seed_style_model_by_a_manual_loop():
    """forward(idx, targets) -> loss, tied head, batches of two rows: mean over batches of the squared gradient
    of each batch's loss, computed here with .backward() on a fresh copy."""
    torch.manual_seed(1)
    model = SeedLM()
    rows = torch.randint(0, 19, (6, 8))  # rows carry seq_len + 1 tokens: inputs and targets
    batches = [rows[i:i + 2] for i in range(0, 6, 2)]
    got = fisher_diagonal(model, batches, model_loss(adapter_for(model)))
    ref = SeedLM()
    ref.load_state_dict(model.state_dict())
    acc = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for b in batches:
        ref.zero_grad()
        ref(b[:, :-1], b[:, 1:]).backward()
        for n, p in ref.named_parameters():
            acc[n] += p.grad.square()
    assert set(got) == {"tok_emb.weight", "fc.weight"}
    for n in got:
        torch.testing.assert_close(got[n], acc[n] / len(batches), rtol=1e-5, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())  # the model's .grad is left alone


class TwoBranches(nn.Module):
    """h = 10 * a(x) + b(x): a and b see the same input, so a's gradient is exactly 10x b's and its Fisher
    (and the true cost of its error) 100x."""

    def __init__(self, vocab: int = 32, width: int = 64):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.a = nn.Linear(width, width, bias=False)
        self.b = nn.Linear(width, width, bias=False)
        self.head = nn.Linear(width, vocab, bias=False)
        with torch.no_grad():
            # a's rows permuted: per-row quantization errs identically, so mse cannot tell them apart
            self.b.weight.copy_(self.a.weight[torch.randperm(width)])

    def forward(self, idx):
        x = self.emb(idx)
        return self.head(torch.tanh(10 * self.a(x) + self.b(x)))


def _bytes_bits(result) -> dict[str, tuple[int, int]]:
    return {t.name: (t.bytes, t.bits) for t in result.tensors}


def test_fisher_moves_bytes_to_the_tensor_whose_error_matters_100x(tmp_path):
    torch.manual_seed(2)
    model = TwoBranches()
    f = fisher(model, torch.randint(0, 32, (40 * 16,)).numpy(), seq_len=16)
    ratio = float(f["a.weight"].sum() / f["b.weight"].sum())
    assert ratio == pytest.approx(100.0, rel=1e-4)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    opts = dict(scheme="rtn", fp16_candidate=False, codecs=("ans",), lqer="off")
    free = compress(sd, None, budget=10**6, **opts, dry_run=True)
    lean = compress(sd, None, budget=10**6, bits=(2,), **opts, dry_run=True)
    budget = (free.bytes_total + lean.bytes_total) // 2  # room for about 5 bits each, so a choice to make
    by_mse = _bytes_bits(compress(sd, None, budget=budget, loss_proxy="mse", **opts, dry_run=True))
    by_fisher = _bytes_bits(compress(sd, None, budget=budget, loss_proxy="fisher", fisher=f, **opts, dry_run=True))
    assert by_fisher["a.weight"][1] >= by_fisher["b.weight"][1] + 2  # at least two widths more for a
    assert by_mse["a.weight"][1] <= by_mse["b.weight"][1] + 1  # mse sees twins
    gain = by_fisher["a.weight"][0] - by_mse["a.weight"][0]
    assert gain > 0 and by_fisher["b.weight"][0] < by_mse["b.weight"][0]  # bytes moved from b to a
    # "auto" is fisher when Fisher is given and mse when not
    assert _bytes_bits(compress(sd, None, budget=budget, loss_proxy="auto", fisher=f, **opts,
                                dry_run=True)) == by_fisher
    assert _bytes_bits(compress(sd, None, budget=budget, loss_proxy="auto", **opts, dry_run=True)) == by_mse


def test_fisher_proxy_refuses_missing_or_mismatched_sensitivities():
    torch.manual_seed(3)
    sd = {k: v.detach() for k, v in TwoBranches().state_dict().items()}
    with pytest.raises(QpackInputError, match="needs Fisher sensitivities"):
        compress(sd, None, budget=20000, loss_proxy="fisher", dry_run=True)
    with pytest.raises(QpackInputError, match="does not match|is \\(3,\\)"):
        compress(sd, None, budget=20000, loss_proxy="fisher", fisher={"a.weight": torch.ones(3)}, dry_run=True)
    with pytest.raises(QpackInputError, match="does not hold"):
        compress(sd, None, budget=20000, loss_proxy="fisher", fisher={"nope": torch.ones(3)}, dry_run=True)
    with pytest.raises(QpackInputError, match="loss proxy must be"):
        CompressConfig(loss_proxy="fishy")


def test_cli_fisher_without_calibration_is_one_line_and_no_file(tmp_path):
    torch.manual_seed(4)
    ckpt = tmp_path / "m.pt"
    torch.save(TwoBranches().state_dict(), ckpt)
    out = tmp_path / "m.qpk"
    r = CliRunner().invoke(main, ["compress", str(ckpt), "--budget", "20000", "--loss-proxy", "fisher",
                                  "-o", str(out)])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qpack: error:") and "--calib" in lines[0], r.output
    assert not out.exists()


MODEL_SRC = '''
import torch
import torch.nn as nn


class TwoBranches(nn.Module):
    def __init__(self, vocab=32, width=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.a = nn.Linear(width, width, bias=False)
        self.b = nn.Linear(width, width, bias=False)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        return self.head(torch.tanh(10 * self.a(x) + self.b(x)))


def make():
    return TwoBranches()


class NoGrad(TwoBranches):
    def forward(self, idx):
        with torch.no_grad():
            return super().forward(idx)


def make_nograd():
    return NoGrad()
'''


@pytest.fixture()
def calib_setup(tmp_path, monkeypatch):
    (tmp_path / "twob_mod.py").write_text(MODEL_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(5)
    ckpt = tmp_path / "m.pt"
    torch.save(TwoBranches().state_dict(), ckpt)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "x_train_000000.bin", np.random.default_rng(0).integers(0, 32, 2000).astype(np.uint16))
    common = ["--calib", str(shards), "--calib-tokens", "512", "--seq-len", "16",
              "--scheme", "rtn", "--codec", "ans", "--budget", "13500", "--json"]
    return tmp_path, ckpt, common


def test_cli_fisher_with_calibration_favours_the_sensitive_tensor(calib_setup):
    tmp_path, ckpt, common = calib_setup
    common = [*common, "--arch", "twob_mod:make"]
    res = {}
    for proxy in ("fisher", "auto", "mse"):
        r = CliRunner().invoke(main, ["compress", str(ckpt), *common, "--loss-proxy", proxy,
                                      "-o", str(tmp_path / f"{proxy}.qpk")])
        assert r.exit_code == 0, r.output
        res[proxy] = {t["name"]: t["bits"] for t in json.loads(r.output)["tensors"]}
    assert res["fisher"]["a.weight"] > res["fisher"]["b.weight"]
    assert res["fisher"]["a.weight"] > res["mse"]["a.weight"], res
    assert res["auto"] == res["fisher"]  # with --calib the default is fisher


def test_cli_model_without_a_loss_gradient(calib_setup):
    """A model whose loss has no gradient: --loss-proxy fisher is one error line and no file; auto warns once
    and allocates by mse."""
    tmp_path, ckpt, common = calib_setup
    common = [*common, "--arch", "twob_mod:make_nograd"]
    out = tmp_path / "f.qpk"
    r = CliRunner().invoke(main, ["compress", str(ckpt), *common, "--loss-proxy", "fisher", "-o", str(out)])
    assert r.exit_code == 2 and not out.exists(), r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qpack: error:") and "backward" in lines[0], r.output
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    r = runner.invoke(main, ["compress", str(ckpt), *common, "-o", str(out)])
    assert r.exit_code == 0 and out.exists(), r.output
    assert r.stderr.count("qpack: warning: no Fisher sensitivity, loss proxy mse") == 1
    # (this model cannot be tuned either: the auto run warned about that too, on stderr; here tuning is off)
    mse = CliRunner().invoke(main, ["compress", str(ckpt), *common, "--loss-proxy", "mse", "--tune-epochs", "0",
                                    "-o", str(tmp_path / "m.qpk")])
    assert json.loads(r.stdout)["tensors"] == json.loads(mse.output)["tensors"]


def test_fisher_est_loss_is_half_fisher_weighted_squared_error_and_uncovered_tensors_take_the_mean(tmp_path):
    """Each block's est_loss is 0.5 * sum(F * (w - wq)^2) of the stored weights; a tensor the Fisher does not
    cover is weighed by the mean Fisher of those it does."""
    from qpack.artifact import read_artifact

    torch.manual_seed(6)
    model = TwoBranches()
    f = fisher(model, torch.randint(0, 32, (20 * 16,)).numpy(), seq_len=16)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = tmp_path / "f.qpk"
    r = compress(sd, out, budget=14000, loss_proxy="fisher", fisher={"a.weight": f["a.weight"]}, scheme="rtn",
                 fp16_candidate=False, codecs=("ans",), lqer="off")
    art = read_artifact(out)
    est = {t.name: t.est_loss for t in r.tensors}
    e_a = (sd["a.weight"].double() - art.tensor("a.weight").double()).square()
    e_b = (sd["b.weight"].double() - art.tensor("b.weight").double()).square()
    assert est["a.weight"] == pytest.approx(float((e_a * f["a.weight"].double()).sum()) / 2, rel=1e-6)
    assert est["b.weight"] == pytest.approx(float(e_b.sum() * f["a.weight"].double().mean()) / 2, rel=1e-6)


def test_the_proxy_loss_weighs_by_the_fisher_when_given():
    """The round-to-nearest estimates the solver starts from use the same Fisher weighting as real candidates."""
    from qpack.compress import _diag_loss

    g = torch.Generator().manual_seed(7)
    w, wq, f = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.rand(5, 8, generator=g)
    want = 0.5 * sum(float(f[i, j]) * (float(w[i, j]) - float(wq[i, j])) ** 2 for i in range(5) for j in range(8))
    assert _diag_loss(w, wq, torch.ones(8), f) == pytest.approx(want, rel=1e-9)
    assert _diag_loss(w, wq, None) == pytest.approx(0.5 * float((w - wq).double().square().sum()), rel=1e-9)


def test_probe_sensitivity_is_the_measured_loss_increase_per_tensor():
    """Each tensor alone on a coarse grid: s = 2 * (loss_q - loss) / ||E||^2, measured here on a copy."""
    import copy

    from qpack.calibrate import probe
    from qpack.sensitivity import probe_sensitivity

    torch.manual_seed(8)
    model = LogitsLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = torch.randint(0, 23, (6, 10))
    batches = [rows[:3], rows[3:]]

    def grid(w):  # the probe step: a grid of 0.25 (coarse enough to hurt)
        return torch.round(w / 0.25) * 0.25

    got = probe_sensitivity(model, batches, model_loss(adapter_for(model)), grid, floor=0.0)

    def mean_loss(m):
        with torch.no_grad():
            return sum(float(F.cross_entropy(m(b)[:, :-1].reshape(-1, 23), b[:, 1:].reshape(-1))) for b in batches) / 2

    base = mean_loss(model)
    for name in ("emb.weight", "fc.weight", "head.weight"):
        m = copy.deepcopy(model)
        w = m.state_dict()[name]
        e2 = float((w - grid(w)).double().square().sum())
        with torch.no_grad():
            w.copy_(grid(w))
        want = 2 * (mean_loss(m) - base) / e2
        assert got[name].shape == w.shape
        assert float(got[name][0, 0]) == pytest.approx(want, rel=1e-4, abs=1e-7)
        assert torch.equal(got[name], torch.full(w.shape, float(got[name][0, 0])))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # every weight is put back
    # the calibrate-level probe: RTN at 3 bits on the calibration rows, usable as compress(fisher=...)
    s = probe(model, rows.reshape(-1).numpy(), seq_len=10, bits=3)
    assert set(s) == {"emb.weight", "fc.weight", "head.weight"} and all(float(v.min()) > 0 for v in s.values())


def _fisher_worker(rank: int, world: int, port: int, stream: str, result: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        f = fisher(LogitsLM(), np.load(stream), seq_len=9)  # each rank takes every other row
        torch.save(f, f"{result}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_sum_their_rows_into_one_fisher(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stream = np.random.default_rng(9).integers(0, 23, 9 * 6).astype(np.int64)
    np.save(tmp_path / "stream.npy", stream)
    mp.spawn(_fisher_worker, args=(2, port, str(tmp_path / "stream.npy"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = LogitsLM()
    want = _per_row_fisher_func(model, torch.from_numpy(stream).reshape(6, 9))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(got) == {"emb.weight", "fc.weight", "head.weight"}
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-9)

"""Passthrough tuning (qpack.tune): the unquantized float tensors fitted to the float model after quantization."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from qpack.calibrate import tuner
from qpack.cli import main
from qpack.compress import compress
from qpack.errors import QpackInputError
from qpack.statedict import load
from qpack.tune import PassthroughTuner, TuneReport

VOCAB, WIDTH = 48, 32


class GainLM(nn.Module):
    """Embedding -> linear -> per-channel gain -> relu -> head: the gain is a passthrough tensor (32 values, below
    compress's min_numel) sitting right after a quantized matrix."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.fc = nn.Linear(WIDTH, 128, bias=False)
        self.gain = nn.Parameter(torch.ones(128))
        self.head = nn.Linear(128, VOCAB, bias=False)

    def forward(self, idx):
        return self.head(F.relu(self.fc(self.emb(idx)) * self.gain))


def _model_and_tokens(seed=0):
    torch.manual_seed(seed)
    m = GainLM()
    with torch.no_grad():
        m.emb.weight.mul_(2.0)
        m.fc.weight.mul_(3.0)
        m.gain.uniform_(0.5, 1.5)
    g = np.random.default_rng(seed)
    # a Markov chain, so the logits carry structure worth matching
    trans = g.dirichlet(np.full(VOCAB, 0.3), size=VOCAB)
    toks = [0]
    for _ in range(8191):
        toks.append(int(g.choice(VOCAB, p=trans[toks[-1]])))
    return m, np.asarray(toks, dtype=np.int64)


def _kl(teacher, student, tokens, seq=64):
    rows = torch.as_tensor(tokens[: len(tokens) // seq * seq]).reshape(-1, seq)
    with torch.no_grad():
        t, s = F.log_softmax(teacher(rows), -1), F.log_softmax(student(rows), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_a_gain_undoes_a_scale_error_of_the_matrix_before_it():
    """The 'quantized' fc is the float one times 0.8 per row: the gain can absorb it exactly (relu is positively
    homogeneous), and tuning gets most of the way there; the held-out KL falls and the kept values say so."""
    m, tokens = _model_and_tokens()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["fc.weight"] = state["fc.weight"] * 0.8
    tune = tuner(m, tokens, seq_len=64, epochs=6, lr=0.02)
    report = tune(state, ["gain"])
    assert isinstance(report, TuneReport) and report.tensors == 1 and set(report.values) == {"gain"}
    assert report.kl_after < 0.2 * report.kl_before
    ratio = (report.values["gain"] / m.gain.detach()).mean()
    assert abs(float(ratio) - 1.25) < 0.05  # 1 / 0.8: the error undone
    student = GainLM()
    student.load_state_dict({**state, "gain": report.values["gain"]})
    untuned = GainLM()
    untuned.load_state_dict(state)
    assert _kl(m, student, tokens) < 0.2 * _kl(m, untuned, tokens)  # on every row, computed here
    assert m.gain.requires_grad and float(m.gain.detach().sum()) != float(report.values["gain"].sum())  # untouched


def test_nothing_to_gain_leaves_everything_unchanged():
    m, tokens = _model_and_tokens(1)
    report = tuner(m, tokens, seq_len=64, epochs=2)(m.state_dict(), ["gain"])
    assert report.values == {} and report.epoch == 0 and report.kl_before == pytest.approx(0.0, abs=1e-7)


def test_the_teacher_is_scored_in_eval_mode_and_left_in_its_own():
    """A model handed over in training mode with dropout: the teacher's distribution is the eval-mode one (so an
    unchanged copy has nothing to gain), and the model's mode is as it was afterwards."""
    m, tokens = _model_and_tokens(7)

    class Dropped(GainLM):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, idx):
            return self.head(self.drop(F.relu(self.fc(self.emb(idx)) * self.gain)))

    d = Dropped()
    d.load_state_dict(m.state_dict())
    d.train()
    report = tuner(d, tokens, seq_len=64, epochs=2)(d.state_dict(), ["gain"])
    assert report.values == {} and report.kl_before == pytest.approx(0.0, abs=1e-7)
    assert d.training


def test_only_float32_parameters_among_the_names_are_trained():
    m, tokens = _model_and_tokens(2)
    state = dict(m.state_dict())
    state["fc.weight"] = state["fc.weight"] * 0.9
    report = tuner(m, tokens, seq_len=64, epochs=1, lr=0.01)(state, ["gain", "not.a.parameter"])
    assert set(report.values) <= {"gain"} and report.tensors == 1


def test_refusals():
    m, tokens = _model_and_tokens()
    with pytest.raises(QpackInputError, match="epochs"):
        tuner(m, tokens, seq_len=64, epochs=-1)
    with pytest.raises(QpackInputError, match="learning rate"):
        tuner(m, tokens, seq_len=64, lr=0.0)
    with pytest.raises(QpackInputError, match="no tensor named"):
        tuner(m, tokens, seq_len=64)({"nope": torch.zeros(3)}, [])

    class LossOnly(GainLM):
        def forward(self, idx, targets):
            return F.cross_entropy(super().forward(idx).flatten(0, 1), targets.flatten())

    with pytest.raises(QpackInputError, match="forward_logits"):
        tuner(LossOnly(), tokens, seq_len=64)


def test_compress_stores_the_tuned_values_within_the_budget(tmp_path):
    m, tokens = _model_and_tokens(3)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    budget = 9_000  # about 3.5 bits/param: the matrices' error is worth undoing
    plain = compress(sd, tmp_path / "p.qpk", budget=budget)
    tuned = compress(sd, tmp_path / "t.qpk", budget=budget, tune=tuner(m, tokens, seq_len=64, epochs=4, lr=0.01))
    # emb.weight (1,536 values) is under min_numel, so it passes through as fp16 too: both are tuned
    assert plain.tune is None and tuned.tune["changed"] == tuned.tune["tensors"] == 2
    assert tuned.bytes_total <= budget and (tmp_path / "t.qpk").stat().st_size == tuned.bytes_model
    a, b = load(tmp_path / "p.qpk"), load(tmp_path / "t.qpk")
    assert not torch.equal(a["gain"], b["gain"]) and not torch.equal(a["emb.weight"], b["emb.weight"])
    for name in ("fc.weight", "head.weight"):
        assert torch.equal(a[name], b[name])  # the same picks: only the passthrough values moved
    sa, sb = GainLM(), GainLM()
    sa.load_state_dict(a)
    sb.load_state_dict(b)
    assert _kl(m, sb, tokens) < _kl(m, sa, tokens)
    assert tuned.as_dict()["tune"]["heldout_kl_after"] < tuned.as_dict()["tune"]["heldout_kl_before"]


def test_values_that_code_larger_than_the_headroom_are_solved_again(tmp_path):
    """A tuner whose values zstd cannot squeeze (noise in every bit) makes the same picks overflow: compress solves
    again around them and still lands under the budget."""
    m, _ = _model_and_tokens(4)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    sd["gain"] = torch.ones(128)  # compresses to almost nothing as given
    budget = 9_000

    def noisy(state, names):
        return TuneReport(values={"gain": torch.rand(128, generator=torch.Generator().manual_seed(0)) + 0.5},
                          kl_before=1.0, kl_after=0.5, epoch=1, epochs=1, tensors=1)

    r = compress(sd, tmp_path / "n.qpk", budget=budget, tune=noisy)
    assert r.bytes_total <= budget
    out = load(tmp_path / "n.qpk")
    assert torch.equal(out["gain"], noisy(None, None).values["gain"].half().float())

    def stray(state, names):
        return TuneReport(values={"fc.weight": torch.zeros(128, WIDTH)}, tensors=1)

    with pytest.raises(QpackInputError, match="not a passthrough"):
        compress(sd, None, budget=budget, tune=stray)


MODEL_SRC = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class GainLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(48, 32)
        self.fc = nn.Linear(32, 128, bias=False)
        self.gain = nn.Parameter(torch.ones(128))
        self.head = nn.Linear(128, 48, bias=False)

    def forward(self, idx):
        return self.head(F.relu(self.fc(self.emb(idx)) * self.gain))


class LossOnly(GainLM):
    def forward(self, idx, targets):
        return F.cross_entropy(super().forward(idx).flatten(0, 1), targets.flatten())


def make():
    return GainLM()


def make_loss_only():
    return LossOnly()
'''


@pytest.fixture()
def cli_setup(tmp_path, monkeypatch):
    import sys

    from qpack.data.shards import write_shard

    (tmp_path / "gainlm_mod.py").write_text(MODEL_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("gainlm_mod", None)
    m, tokens = _model_and_tokens(5)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "fineweb_train_000000.bin", tokens)
    return tmp_path, data


def test_cli_tunes_by_default_with_calib_and_reports_it(cli_setup):
    tmp_path, data = cli_setup
    args = ["compress", str(tmp_path / "m.pt"), "--arch", "gainlm_mod:make", "--calib", str(data), "--seq-len", "64",
            "--budget", "9000", "-q"]
    r = CliRunner().invoke(main, args + ["-o", str(tmp_path / "a.qpk"), "--json"])
    assert r.exit_code == 0, r.output
    t = json.loads(r.output)["tune"]
    assert t["tensors"] == 2 and t["epochs"] == 4 and t["heldout_kl_after"] <= t["heldout_kl_before"]
    r = CliRunner().invoke(main, args + ["-o", str(tmp_path / "b.qpk")])
    assert r.exit_code == 0 and "held-out KL" in r.output
    r = CliRunner().invoke(main, args + ["-o", str(tmp_path / "c.qpk"), "--tune-epochs", "0", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["tune"] is None


@pytest.mark.parametrize("extra, message", [
    (["--tune-epochs", "-1"], "--tune-epochs must be 0 or more"),
    (["--arch", "gainlm_mod:make_loss_only", "--tune-epochs", "2"], "forward_logits"),
])
def test_cli_bad_tune_requests_are_one_line_exit_2_no_file(cli_setup, extra, message):
    tmp_path, data = cli_setup
    args = ["compress", str(tmp_path / "m.pt"), "--calib", str(data), "--seq-len", "64", "--budget", "9000", "-q",
            "-o", str(tmp_path / "x.qpk")]
    if "--arch" not in extra:
        args += ["--arch", "gainlm_mod:make"]
    r = CliRunner().invoke(main, args + extra)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "x.qpk").exists()
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "--budget", "9000", "--tune-epochs", "2"])
    assert r.exit_code == 2 and "--tune-epochs only matters with --calib" in r.output


def test_cli_a_model_without_logits_is_compressed_untuned_with_one_warning(cli_setup):
    tmp_path, data = cli_setup
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "--arch", "gainlm_mod:make_loss_only",
                                  "--calib", str(data), "--seq-len", "64", "--budget", "9000", "-q", "--json",
                                  "-o", str(tmp_path / "y.qpk")])
    assert r.exit_code == 0, r.output
    assert "warning: no passthrough tuning" in r.output
    assert json.loads(r.output[r.output.index("{"):])["tune"] is None


def test_logits_without_a_gradient_are_refused_when_the_tuner_is_made():
    m, tokens = _model_and_tokens(6)

    class Detached(GainLM):
        def forward(self, idx):
            return super().forward(idx).detach()

    d = Detached()
    d.load_state_dict(m.state_dict())
    with pytest.raises(QpackInputError, match="no gradient"):
        tuner(d, tokens, seq_len=64)
    assert all(p.requires_grad for p in d.parameters())  # flags restored

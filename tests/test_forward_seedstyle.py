"""A seeds-style GPT (forward(input_ids, target_ids) -> loss, forward_logits, bf16 embedding, tied head) through
calibration, GPTQ compress (CLI and Python API) and `qpack eval --arch`: the artifact scores within 0.05 bpb."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import qpack
import seedstyle
from qpack.cli import main
from qpack.hessian import calibration_batches

ARCH = "seedstyle:build"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data folder, checkpoint of a model trained for a few steps, checkpoint of the untrained model)."""
    root = tmp_path_factory.mktemp("seeds")
    data = seedstyle.make_data(root / "data")
    torch.manual_seed(0)
    untrained = seedstyle.to_seed_dtypes(seedstyle.SeedGPT())
    torch.save(untrained.state_dict(), root / "untrained.pt")
    torch.manual_seed(0)
    model = seedstyle.SeedGPT()
    losses = seedstyle.train(model, seedstyle.markov_tokens(20000, seed=2))
    assert losses[-1] < losses[0] - 2.0  # it learned the chain
    seedstyle.to_seed_dtypes(model)
    torch.save(model.state_dict(), root / "final_model.pt")  # a bare state dict, as the seeds save theirs
    return data, root / "final_model.pt", root / "untrained.pt"


def _cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def _eval_bpb(path, data) -> float:
    r = _cli("eval", path, "--data", data, "--arch", ARCH, "--window", 64, "--stride", 32, "--no-plain", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)["val_bpb"]


def test_saved_dtypes_are_the_seeds(trained):
    sd = torch.load(trained[1], weights_only=True)
    assert sd["tok_emb.weight"].dtype == torch.bfloat16
    assert sd["blocks.0.fc.weight"].dtype == torch.float32 and sd["blocks.1.q_gain"].dtype == torch.float32
    assert not sd["blocks.0.mlp_out.weight"].eq(0).all()  # trained away from its zero init


def test_cli_gptq_compress_and_eval_arch(trained, tmp_path):
    data, ckpt, untrained = trained
    out = tmp_path / "cli.qpk"
    r = _cli("compress", ckpt, "--arch", ARCH, "--calib", data, "--calib-tokens", 4096, "--bits", 6,
             "--device", "cpu", "--json", "-o", out)
    assert r.exit_code == 0, r.output
    schemes = {t["name"]: t["scheme"] for t in json.loads(r.output)["tensors"]}
    # every matrix got a Hessian: linears through hooks, the tied embedding through its F.linear head
    assert schemes["tok_emb.weight"] == "gptq"
    assert all(s == "gptq" for n, s in schemes.items() if n.endswith(".weight")), schemes
    bpb_ckpt, bpb_art, bpb_random = _eval_bpb(ckpt, data), _eval_bpb(out, data), _eval_bpb(untrained, data)
    assert bpb_ckpt < bpb_random - 1.0  # the model is not random
    assert abs(bpb_art - bpb_ckpt) < 0.05, (bpb_art, bpb_ckpt)


def test_python_api_calibrate_compress_load(trained, tmp_path):
    data, ckpt, _ = trained
    model = seedstyle.build()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    tokens = seedstyle.markov_tokens(2000, seed=3)
    hessians = qpack.calibrate(model, tokens, seq_len=64)
    # the tied head's input is the final hidden state of the *inputs* rows[:, :-1] (rows hold seq_len + 1 tokens)
    rows = torch.cat(calibration_batches(tokens, len(tokens), 65, 8))
    with torch.no_grad():
        hid = model._hidden(rows[:, :-1]).float().reshape(-1, seedstyle.WIDTH)
    torch.testing.assert_close(hessians["tok_emb.weight"], hid.T @ hid / hid.shape[0], rtol=1e-3, atol=1e-5)
    assert {n for n, p in model.named_parameters() if n.endswith(".weight")} == set(hessians)

    out = tmp_path / "api.qpk"
    result = qpack.compress(model.state_dict(), out, budget="60KB", hessians=hessians, code=[seedstyle.__file__])
    code_bytes = len(open(seedstyle.__file__, "rb").read())
    assert result.bytes_code == code_bytes and result.bytes_total <= 60_000 == result.budget
    assert any(t.scheme in ("gptq", "uniform") for t in result.tensors)  # the Hessians reached GPTQ
    state = qpack.load(out, device="cpu")
    again = seedstyle.build()
    again.load_state_dict(state)
    with torch.no_grad():
        x = torch.from_numpy(tokens[:64]).unsqueeze(0)
        rel = (again.forward_logits(x) - model.forward_logits(x)).norm() / model.forward_logits(x).norm()
    assert rel < 0.1
    assert abs(_eval_bpb(out, data) - _eval_bpb(ckpt, data)) < 0.05


def test_forward_function_from_the_command_line(trained):
    data, ckpt, _ = trained
    r = _cli("eval", ckpt, "--data", data, "--arch", ARCH, "--forward", "seedstyle:logits_of", "--window", 64,
             "--no-plain", "--max-tokens", 500, "--json")
    assert r.exit_code == 0, r.output
    via_method = _cli("eval", ckpt, "--data", data, "--arch", ARCH, "--window", 64, "--no-plain",
                      "--max-tokens", 500, "--json")
    assert json.loads(r.output)["val_bpb"] == json.loads(via_method.output)["val_bpb"]


def test_calibration_uses_seq_len_plus_one_rows(trained):
    """Calibrating a targets model feeds rows of seq_len + 1 tokens: inputs seq_len, targets shifted by one."""
    model = seedstyle.build()
    seen = []
    orig = model.forward

    def spy(input_ids, target_ids):
        seen.append((input_ids.clone(), target_ids.clone()))
        return orig(input_ids, target_ids)

    model.forward = spy
    tokens = np.arange(3, 3 + 130) % seedstyle.VOCAB
    qpack.calibrate(model, tokens, seq_len=64)
    x, y = seen[0]
    assert x.shape[1] == 64 and torch.equal(x[:, 1:], y[:, :-1])
    assert int(x[0, 0]) == 3 and int(y[0, -1]) == 3 + 64

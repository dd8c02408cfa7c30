"""`qpack compress --calib` through the CLI: --arch factories, shard and text calibration, and clear errors."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from qpack.cli import main
from qpack.data.shards import write_shard

MODEL_SRC = '''
import torch.nn as nn

class TinyLM(nn.Module):
    def __init__(self, vocab=64, width=48):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.fc = nn.Linear(width, 96)
        self.out = nn.Linear(96, vocab)

    def forward(self, idx):
        return self.out(self.fc(self.emb(idx)).relu())

def make():
    return TinyLM()

def make_wide():
    return TinyLM(width=64)
'''


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    (tmp_path / "tinylm_mod.py").write_text(MODEL_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tinylm_mod", None)
    import tinylm_mod

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save(tinylm_mod.make().state_dict(), ckpt)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "x_train_000000.bin", np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16))
    return tmp_path, ckpt, shards


def _run(*args):
    return CliRunner().invoke(main, ["compress", *map(str, args)])


def test_arch_and_shard_calibration_give_gptq(setup):
    tmp, ckpt, shards = setup
    r = _run(ckpt, "--calib", shards, "--arch", "tinylm_mod:make", "--calib-tokens", "2048", "--seq-len", "32",
             "--bits", "4", "--min-numel", "1024", "--json", "-o", tmp / "a.qpk")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    schemes = {t["name"]: t["scheme"] for t in d["tensors"]}
    assert schemes["fc.weight"] == schemes["out.weight"] == "gptq"
    # The embedding is never an nn.Linear input here, so it has no Hessian and falls back to GPTQ-lite.
    assert schemes["emb.weight"] == "gptq_lite"


def test_arch_mismatch_is_one_clear_line(setup):
    tmp, ckpt, shards = setup
    r = _run(ckpt, "--calib", shards, "--arch", "tinylm_mod:make_wide", "-o", tmp / "b.qpk")
    assert r.exit_code == 2
    assert "does not match the state dict" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp / "b.qpk").exists()


def test_calibration_errors(setup):
    tmp, ckpt, shards = setup
    r = _run(ckpt, "--calib", shards, "-o", tmp / "c.qpk")  # a bare state dict names no model
    assert r.exit_code == 2 and "--arch" in r.output
    bad = tmp / "bad_train_000000.bin"
    bad.write_bytes(b"not a shard at all" * 100)
    r = _run(ckpt, "--calib", bad, "--arch", "tinylm_mod:make", "-o", tmp / "c.qpk")
    assert r.exit_code == 2 and "bad_train_000000.bin" in r.output
    r = _run(ckpt, "--calib", tmp / "nope", "--arch", "tinylm_mod:make", "-o", tmp / "c.qpk")
    assert r.exit_code == 2 and "not found" in r.output
    text = tmp / "calib.txt"
    text.write_text("hello world\n" * 50)
    r = _run(ckpt, "--calib", text, "--arch", "tinylm_mod:make", "-o", tmp / "c.qpk")
    assert r.exit_code == 2 and "--tokenizer" in r.output
    r = _run(ckpt, "--arch", "no_such_module_xyz:make", "--calib", shards, "-o", tmp / "c.qpk")
    assert r.exit_code == 2 and "cannot import" in r.output
    assert not (tmp / "c.qpk").exists()


def test_code_files_count_against_budget(setup):
    tmp, ckpt, _ = setup
    code = tmp / "train.py"
    code.write_text("print('hello')\n" * 400)
    r = _run(ckpt, "--budget", "30KB", "--code", code, "--code-codec", "lzma", "--min-numel", "1024", "--json",
             "-o", tmp / "d.qpk")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    from qpack.codecs import make_codec

    # The code is counted as it ships: lzma-compressed, so far below its 6,000 raw bytes.
    assert d["bytes_code"] == len(make_codec("lzma").encode(code.read_bytes())) < code.stat().st_size // 10
    assert d["bytes_total"] == d["bytes_model"] + d["bytes_code"] <= 30_000

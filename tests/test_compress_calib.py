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

SEEN = []  # sequence lengths the model was called with


class TinyLM(nn.Module):
    def __init__(self, vocab=64, width=48):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.fc = nn.Linear(width, 96)
        self.out = nn.Linear(96, vocab)

    def forward(self, idx):
        SEEN.append(idx.shape[1])
        return self.out(self.fc(self.emb(idx)).relu())


class Fails(TinyLM):
    def forward(self, idx):
        raise ValueError("this model wants a dict of features")


def make_failing():
    return Fails()


def logits(model, input_ids):
    return TinyLM.forward(model, input_ids)

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


def _one_line(r, *words):  # with -q: no progress bars in the captured output
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qpack: error:"), r.output
    for w in words:
        assert w in lines[0], lines[0]


def test_model_failing_on_calibration_tokens_is_one_line(setup):
    tmp, ckpt, shards = setup
    r = _run(ckpt, "--calib", shards, "--arch", "tinylm_mod:make_failing", "--seq-len", "32", "-q",
             "-o", tmp / "f.qpk")
    _one_line(r, "Fails.forward(input_ids[", "ValueError: this model wants a dict of features")
    assert not (tmp / "f.qpk").exists()


def test_forward_flag(setup):
    tmp, ckpt, shards = setup
    r = _run(ckpt, "--calib", shards, "--arch", "tinylm_mod:make", "--forward", "tinylm_mod:nope", "-o", tmp / "g.qpk")
    _one_line(r, "--forward tinylm_mod:nope", "no attribute")
    r = _run(ckpt, "--calib", shards, "--arch", "tinylm_mod:make", "--forward", "no_such_qp_mod:f", "-o", tmp / "g.qpk")
    _one_line(r, "cannot import")
    assert not (tmp / "g.qpk").exists()
    # a --forward that works is what calibration calls: the failing model calibrates through it
    r = _run(ckpt, "--calib", shards, "--arch", "tinylm_mod:make_failing", "--forward", "tinylm_mod:logits",
             "--seq-len", "32", "--calib-tokens", "1024", "--min-numel", "1024", "--json", "-o", tmp / "g.qpk")
    assert r.exit_code == 0, r.output
    assert {t["name"]: t["scheme"] for t in json.loads(r.output)["tensors"]}["fc.weight"] == "gptq"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_a_gpu(setup):
    tmp, ckpt, shards = setup
    r = _run(ckpt, "--calib", shards, "--arch", "tinylm_mod:make", "--device", "cuda", "-o", tmp / "h.qpk")
    _one_line(r, "--device cuda", "no CUDA device")
    assert not (tmp / "h.qpk").exists()


def test_flags_that_would_do_nothing(setup, tmp_path):
    tmp, ckpt, shards = setup
    out = tmp_path / "n.qpk"
    for args, words in ((["--arch", "tinylm_mod:make"], "--arch only matters with --calib"),
                        (["--seq-len", "32", "--calib-tokens", "100"], "--seq-len, --calib-tokens only matter with --calib"),
                        (["--tokenizer", tmp / "t.model"], "--tokenizer"),
                        (["--forward", "tinylm_mod:logits"], "--forward"),
                        (["--device", "cpu"], "--device only matters with --calib"),
                        (["--scheme", "gptq"], "--scheme gptq needs Hessians"),
                        (["--loss-proxy", "hessian"], "--loss-proxy hessian"),
                        (["--loss-proxy", "relative"], "--loss-proxy relative"),
                        (["--code-codec", "lzma"], "--code-codec")):
        _one_line(_run(ckpt, *args, "-o", out), words)
        assert not out.exists()


def test_one_sequence_length_rule(setup):
    import tinylm_mod

    from qpack.calibrate import resolve_seq_len

    assert resolve_seq_len(None, {"block_size": 256}, {"seq_len": 128}) == 128  # seq_len wins over block_size
    assert resolve_seq_len(None, {}, {"train_config": {"train_seq_len": 96}}) == 96
    assert resolve_seq_len(None, {"max_seq_len": 200}) == 200
    assert resolve_seq_len(None, None, available=500) == 500  # 1024 capped by the calibration tokens
    assert resolve_seq_len(None, None) == 1024
    assert resolve_seq_len(64, {"seq_len": 128}, available=10) == 64  # explicit wins, uncapped
    tmp, _, shards = setup
    torch.manual_seed(0)
    ckpt = tmp / "with_len.pt"  # as the reference trainer writes it: seq_len beside the model
    torch.save({"model": tinylm_mod.make().state_dict(), "seq_len": 40}, ckpt)
    tinylm_mod.SEEN.clear()
    r = _run(ckpt, "--calib", shards, "--arch", "tinylm_mod:make", "--calib-tokens", "400", "-o", tmp / "s.qpk")
    assert r.exit_code == 0, r.output
    assert set(tinylm_mod.SEEN) == {40}
    tinylm_mod.SEEN.clear()
    r = _run(tmp / "tiny.pt", "--calib", shards, "--arch", "tinylm_mod:make", "--calib-tokens", "300",
             "-o", tmp / "s2.qpk")
    assert r.exit_code == 0, r.output
    assert set(tinylm_mod.SEEN) == {300}  # no length in the checkpoint: 1024, capped by the 300 tokens


def test_checkpoint_saved_on_a_device_that_is_absent_loads_on_the_cpu(setup):
    """Storages tagged cuda:0 (saved on a GPU) load through map_location on a CPU-only machine."""
    import io
    import zipfile

    import qpack

    tmp, ckpt, _ = setup
    src = zipfile.ZipFile(ckpt)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            out.writestr(info.filename, data)
    on_gpu = tmp / "saved_on_gpu.pt"
    on_gpu.write_bytes(buf.getvalue())
    for path, name in ((ckpt, "cpu.qpk"), (on_gpu, "gpu.qpk")):
        r = _run(path, "--bits", "5", "--min-numel", "1024", "-q", "-o", tmp / name)
        assert r.exit_code == 0, r.output
    a, b = qpack.load(tmp / "cpu.qpk"), qpack.load(tmp / "gpu.qpk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_checkpoint_is_read_once_for_calibration_and_compress(setup, monkeypatch):
    import qpack.checkpoint as ckpt_mod

    tmp, ckpt, shards = setup
    real, calls = ckpt_mod.load_state_dict, []
    monkeypatch.setattr(ckpt_mod, "load_state_dict", lambda path, *a, **k: calls.append(path) or real(path, *a, **k))
    r = _run(ckpt, "--calib", shards, "--arch", "tinylm_mod:make", "--calib-tokens", "2048", "--seq-len", "32",
             "--bits", "6", "-o", tmp / "once.qpk", "-q")
    assert r.exit_code == 0, r.output
    assert calls == [ckpt]

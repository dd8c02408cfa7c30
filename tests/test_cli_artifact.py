"""`qpack decompress` and `qpack inspect`: outputs match the library exactly; bad input is one line and exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from qpack.artifact import TensorEntry, read_artifact, write_artifact
from qpack.cli import main
from qpack.codecs import codec_names, make_codec
from qpack.quant import make_quantizer

CODEC = "zstd" if "zstd" in codec_names() else "raw"
CONFIG = {"arch": "gpt", "n_layer": 2, "d_model": 16}


def quant(shape, bits, seed, group_size=None):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return make_quantizer("rtn", bits, group_size).quantize(w)


@pytest.fixture
def artifact(tmp_path):
    c = make_codec(CODEC, {})
    entries = [
        TensorEntry("tok_emb.weight", quant((32, 16), 6, 0), codec=c, scale_codec=c),
        TensorEntry("blocks.0.mlp.fc.weight", quant((24, 16), 4, 1, group_size=8), layout="packed", codec=c,
                    lowrank=(quant((24, 2), 4, 2), quant((2, 16), 4, 3))),
        TensorEntry("blocks.0.norm.weight", torch.ones(16, dtype=torch.float16), codec=c),
        TensorEntry("step", torch.tensor(12345, dtype=torch.int64)),
    ]
    path = tmp_path / "model.qpk"
    write_artifact(path, entries, {"model_config": CONFIG})
    return path


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qpack: error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_decompress_pt_keeps_config_and_exact_tensors(artifact, tmp_path):
    out = tmp_path / "out.pt"
    result = run("decompress", artifact, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "wrote" in result.output and "with model config" in result.output
    obj = torch.load(out, weights_only=True)
    assert obj["config"] == CONFIG
    want = read_artifact(artifact).tensors()
    assert list(obj["model"]) == list(want)
    for name, t in want.items():
        assert obj["model"][name].dtype == t.dtype and torch.equal(obj["model"][name], t), name
    # the passthrough tensors are the stored ones, dtype included
    assert obj["model"]["blocks.0.norm.weight"].dtype == torch.float16
    assert obj["model"]["step"].item() == 12345


def test_decompress_without_config_writes_a_bare_state_dict(tmp_path):
    path = tmp_path / "m.qpk"
    write_artifact(path, [TensorEntry("w", quant((4, 8), 5, 9))])
    result = run("decompress", path, "-o", tmp_path / "o.pth", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.output)
    assert summary["tensors"] == 1 and summary["params"] == 32 and summary["config"] is False
    obj = torch.load(tmp_path / "o.pth", weights_only=True)
    assert set(obj) == {"w"} and torch.equal(obj["w"], read_artifact(path).tensor("w"))


def test_decompress_safetensors(artifact, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "out.safetensors"
    result = run("decompress", artifact, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.output)["bytes"] == out.stat().st_size
    sd = load_file(out)
    want = read_artifact(artifact).tensors()
    assert set(sd) == set(want) and all(torch.equal(sd[n], t) for n, t in want.items())
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["qpack_config"]) == CONFIG
    from qpack.checkpoint import load_state_dict

    sd2, cfg, _ = load_state_dict(out)
    assert cfg == CONFIG and all(torch.equal(sd2[n], t) for n, t in want.items())


def test_inspect_json(artifact):
    result = run("inspect", artifact, "--json")
    assert result.exit_code == 0, result.stderr
    rep = json.loads(result.output)
    assert set(rep) >= {"path", "bytes_total", "params", "bits_per_param", "meta", "tensors"}
    assert rep["bytes_total"] == artifact.stat().st_size
    assert rep["params"] == 32 * 16 + 24 * 16 + 16 + 1
    assert rep["bits_per_param"] == pytest.approx(8 * rep["bytes_total"] / rep["params"], abs=1e-5)
    assert rep["meta"]["model_config"] == CONFIG
    by = {t["name"]: t for t in rep["tensors"]}
    assert list(by) == ["tok_emb.weight", "blocks.0.mlp.fc.weight", "blocks.0.norm.weight", "step"]
    emb, fc, norm = by["tok_emb.weight"], by["blocks.0.mlp.fc.weight"], by["blocks.0.norm.weight"]
    assert (emb["scheme"], emb["bits"], emb["group_size"], emb["layout"]) == ("rtn", 6, None, "byte")
    assert (fc["bits"], fc["group_size"], fc["layout"], fc["lowrank_rank"]) == (4, 8, "packed", 2)
    assert emb["codec"]["name"] == CODEC and norm["scheme"] == "raw" and norm["bits"] == 16
    container = read_artifact(artifact).container
    for t in rep["tensors"]:
        assert t["bytes"] == t["bytes_codes"] + t["bytes_scales"] + t["bytes_lowrank"]
        secs = [s for s in container.sections if s.name.startswith(t["name"] + ":")]
        assert t["bytes"] == sum(s.length for s in secs)
        assert t["bits_per_param"] == pytest.approx(8 * t["bytes"] / t["params"], abs=1e-5)
    assert rep["bytes_overhead"] == rep["bytes_total"] - sum(t["bytes"] for t in rep["tensors"])
    assert run("inspect", artifact, "--json").output == result.output  # deterministic


def test_inspect_table(artifact):
    result = run("inspect", artifact, "--verify")
    assert result.exit_code == 0, result.stderr
    lines = result.output.splitlines()
    assert lines[0].split() == ["tensor", "shape", "scheme", "bits", "group", "layout", "codec", "bytes",
                                "bits/param"]
    row = next(line for line in lines if line.startswith("blocks.0.mlp.fc.weight"))
    assert row.split()[1:6] == ["24x16", "rtn+lqer2", "4", "8", "packed"]
    assert any(line.startswith("bytes total") and f"{artifact.stat().st_size:,}" in line for line in lines)


@pytest.mark.parametrize("damage", ["flip", "truncate", "junk", "magic", "empty"])
def test_bad_artifacts_exit_2_and_write_nothing(artifact, tmp_path, damage):
    data = bytearray(artifact.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[:-10]
    elif damage == "junk":
        data += b"junk"
    elif damage == "magic":
        data[:4] = b"PK\x03\x04"
    else:
        data = b""
    bad = tmp_path / "bad.qpk"
    bad.write_bytes(bytes(data))
    for cmd in (["inspect", bad], ["inspect", bad, "--json"], ["decompress", bad, "-o", tmp_path / "o.pt"]):
        assert_one_line_error(run(*cmd), "bad.qpk")
    assert sorted(os.listdir(tmp_path)) == ["bad.qpk", "model.qpk"]


def test_failed_decompress_leaves_existing_output_untouched(tmp_path):
    bad = tmp_path / "bad.qpk"
    bad.write_bytes(b"QPACK\x00\r\n" + b"\0" * 40)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"previous")
    assert_one_line_error(run("decompress", bad, "-o", out), "bad.qpk")
    assert out.read_bytes() == b"previous" and sorted(os.listdir(tmp_path)) == ["bad.qpk", "o.safetensors"]


def test_bad_arguments(artifact, tmp_path):
    assert_one_line_error(run("inspect", tmp_path / "missing.qpk"), "missing.qpk", "no such file")
    assert_one_line_error(run("decompress", tmp_path / "missing.qpk", "-o", tmp_path / "o.pt"), "missing.qpk")
    assert_one_line_error(run("decompress", artifact, "-o", tmp_path / "o.txt"), "o.txt")
    assert_one_line_error(run("decompress", artifact, "-o", tmp_path / "nodir" / "o.pt"), "o.pt")
    assert_one_line_error(run("inspect", tmp_path), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["model.qpk"]


def test_real_process_prints_one_line(tmp_path):
    bad = tmp_path / "x.qpk"
    bad.write_bytes(b"not an artifact at all")
    proc = subprocess.run([sys.executable, "-m", "qpack.cli", "inspect", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"qpack: error: {bad}: not a qpack artifact (wrong magic bytes)"


def test_output_directory_is_refused(artifact, tmp_path):
    (tmp_path / "d.pt").mkdir()
    assert_one_line_error(run("decompress", artifact, "-o", tmp_path / "d.pt"), "d.pt", "directory")

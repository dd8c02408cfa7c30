"""bench-codecs: the library on small samples, the JSON schema, entropy accounting and bad input."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from qpack import bench
from qpack.cli import main
from qpack.codecs import codec_names

ROW_KEYS = {"codec", "params", "layout", "bits", "bytes", "bits_per_weight", "excess_over_entropy",
            "compress_mb_s", "decompress_mb_s"}


def formula_entropy(codes: np.ndarray) -> float:
    """Order-0 entropy in bits per symbol, from a Counter, independently of qpack.bench."""
    n = codes.size
    return -sum(c / n * math.log2(c / n) for c in Counter(codes.tolist()).values())


def run_cli(*args: str):
    result = CliRunner().invoke(main, ["bench-codecs", *args])
    return result


def test_synthetic_sample_shape_and_determinism():
    a = bench.synthetic_sample()
    assert sum(t.numel() for t in a.values()) == 2_097_152
    assert all(t.shape[1] in (512, 1024) for t in a.values())
    b = bench.synthetic_sample(max_weights=10_000)
    assert 8_000 <= sum(t.numel() for t in b.values()) <= 10_000
    torch.testing.assert_close(b["blocks.0.attn.q"], a["blocks.0.attn.q"][: b["blocks.0.attn.q"].shape[0]])
    # Heavy tails: the MLP rows have a larger kurtosis than the Gaussian attention rows.
    kurt = {k: float(((t / t.std(dim=1, keepdim=True)) ** 4).mean()) for k, t in a.items()}
    assert kurt["blocks.0.mlp.fc"] > 3.5 > kurt["blocks.0.attn.q"] > 2.5


def test_library_rows_round_trip_and_match_sizes():
    weights = bench.synthetic_sample(max_weights=40_000)
    codes = bench.bench_codes_from_weights(weights, [4, 6])
    settings = bench.default_settings()
    result = bench.run_bench(codes, settings, slow_limit=10_000, min_seconds=0.0)
    assert len(result.rows) == 2 * len(settings)
    for r in result.rows:
        assert r.roundtrip, r
        assert r.bits_per_weight == pytest.approx(8 * r.bytes / r.weights)
        assert r.weights <= result.weights[r.bits]
        if r.codec == "raw":
            assert r.bytes == (r.weights if r.layout == "byte" else (r.weights * r.bits + 7) // 8)
    for b, c in codes.items():
        assert result.entropy_bits_per_weight[b] == pytest.approx(formula_entropy(c), rel=1e-9)
    # The sweep covers several levels and both layouts.
    zstd_levels = {r.params["level"] for r in result.rows if r.codec == "zstd"}
    assert {1, 3, 9, 19, 22} <= zstd_levels
    assert {"byte", "packed"} == {r.layout for r in result.rows if r.codec == "zstd"}


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_ans_within_half_percent_of_entropy(bits):
    weights = bench.synthetic_sample(max_weights=300_000, seed=3)
    codes = bench.quantize_weights(weights, bits)
    result = bench.run_bench({bits: codes}, bench.default_settings(["ans"]), min_seconds=0.0)
    h = formula_entropy(codes)
    one_table = [r for r in result.rows if r.params["group"] == 0][0]
    bound_bytes = h * codes.size / 8
    assert one_table.bytes >= bound_bytes
    assert one_table.bytes / bound_bytes - 1 < 0.005
    assert one_table.excess_over_entropy == pytest.approx(one_table.bytes / bound_bytes - 1, rel=1e-9)


def test_subset_rows_spread_over_sample():
    codes = np.arange(10 * 4, dtype=np.int64)
    sub = bench._subset_rows(codes, 4, 12)
    np.testing.assert_array_equal(sub, np.concatenate([np.arange(0, 4), np.arange(16, 20), np.arange(32, 36)]))
    assert bench._subset_rows(codes, 4, None) is codes


def test_cli_json_schema():
    r = run_cli("--json", "--sample-weights", "20000", "--bits", "4,6", "--codecs", "raw,zstd,ans")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)  # stdout holds the JSON object only; progress goes to stderr
    assert set(obj) == {"entropy_bits_per_weight", "rows"}
    assert set(obj["entropy_bits_per_weight"]) == {"4", "6"}
    assert {row["codec"] for row in obj["rows"]} == {"raw", "zstd", "ans"}
    for row in obj["rows"]:
        assert ROW_KEYS <= set(row)
        assert row["roundtrip"] is True
        assert row["bits"] in (4, 6) and row["layout"] in ("byte", "packed")
        assert isinstance(row["params"], dict)
        h = obj["entropy_bits_per_weight"][str(row["bits"])]
        if row["weights"] == 39 * 512:  # full-sample rows (39 rows of 512): excess is against the printed entropy
            assert row["excess_over_entropy"] == pytest.approx(row["bits_per_weight"] / h - 1)


def test_cli_table_and_plot(tmp_path):
    png = tmp_path / "codecs.png"
    r = run_cli("--sample-weights", "8000", "--bits", "5", "--codecs", "zlib,ans", "--plot", str(png))
    assert r.exit_code == 0, r.output
    assert "int5: empirical order-0 entropy" in r.stdout
    assert "zlib" in r.stdout and "ans" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["codecs.png"]


def test_cli_checkpoint_input(tmp_path):
    path = tmp_path / "tiny.pt"
    g = torch.Generator().manual_seed(0)
    torch.save({"a.weight": torch.randn(32, 64, generator=g), "b.weight": torch.randn(16, 64, generator=g),
                "a.bias": torch.randn(32, generator=g)}, path)
    r = run_cli(str(path), "--json", "--bits", "4", "--codecs", "ans")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert all(row["weights"] == 32 * 64 + 16 * 64 for row in obj["rows"])  # the bias is not a matrix


def test_cli_artifact_input(tmp_path):
    from qpack.artifact import TensorEntry, write_artifact
    from qpack.quant import make_quantizer

    g = torch.Generator().manual_seed(1)
    q6 = make_quantizer("rtn", 6).quantize(torch.randn(24, 40, generator=g))
    q4 = make_quantizer("rtn", 4).quantize(torch.randn(8, 40, generator=g))
    path = tmp_path / "m.qpk"
    write_artifact(path, [TensorEntry("w6", q6), TensorEntry("w4", q4), TensorEntry("norm", torch.ones(40))])
    r = run_cli(str(path), "--json", "--codecs", "raw")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["entropy_bits_per_weight"]["6"] == pytest.approx(formula_entropy(q6.q.numpy().reshape(-1)))
    assert obj["entropy_bits_per_weight"]["4"] == pytest.approx(formula_entropy(q4.q.numpy().reshape(-1)))
    r = run_cli(str(path), "--json", "--codecs", "raw", "--bits", "8")
    assert r.exit_code == 2 and "holds codes at [4, 6] bits only" in r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--codecs", "zstd,nope"], "unknown codec 'nope'"),
        (["--bits", "9"], "outside 2..8"),
        (["--bits", "0"], "outside 2..8"),
        (["--bits", "four"], "not an integer"),
        (["--plot", "out.jpg"], "PNG"),
        (["--plot", "/no/such/dir/out.png"], "does not exist"),
        (["/no/such/model.pt"], "/no/such/model.pt: no such file"),
    ],
)
def test_cli_bad_input(args, message):
    r = run_cli(*args, "--sample-weights", "1000")
    assert r.exit_code == 2
    assert message in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_cli_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"this is not a checkpoint")
    r = run_cli(str(bad), "--bits", "4")
    assert r.exit_code == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr


def test_every_registered_codec_is_benchmarked():
    names = {s.codec.name for s in bench.default_settings()}
    assert names == set(codec_names())

"""qpack compress on synthetic state dicts: budgets respected, exact loads, determinism, clear errors."""
from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import qpack
from qpack.artifact import read_artifact
from qpack.cli import main
from qpack.compress import CompressConfig, compress
from qpack.statedict import find_aliases
from qpack.errors import BudgetError, QpackInputError


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "emb.weight": torch.randn(256, 64, generator=g) * 0.02,
        "blocks.0.attn.weight": torch.randn(192, 64, generator=g) * 0.05,
        "blocks.0.mlp.up.weight": torch.randn(256, 64, generator=g) * 0.05,
        "blocks.0.mlp.down.weight": torch.randn(64, 256, generator=g) ** 3 * 0.02,  # heavy-tailed
        "blocks.0.norm.weight": torch.ones(64),
        "step": torch.tensor(7),
    }
    sd["head.weight"] = sd["emb.weight"]  # tied, as GPTs do
    return sd


def _cfg(**kw) -> CompressConfig:
    base = dict(codecs=("ans",), min_numel=1024, chunk_numel=4096)
    base.update(kw)
    return CompressConfig(**base)


def test_aliases_found():
    sd = _state_dict()
    assert find_aliases(sd) == {"head.weight": "emb.weight"}


@pytest.mark.parametrize("budget", [30_000, 45_000, 70_000, 100_000])
def test_budget_respected_and_tight(tmp_path, budget):
    out = tmp_path / "m.qpk"
    res = compress(_state_dict(), out, _cfg(budget=budget))
    size = out.stat().st_size
    assert size == res.bytes_total <= budget
    # Reachable budgets are filled to within 2%.
    assert size >= 0.98 * budget


def test_bigger_budget_means_lower_error(tmp_path):
    errs = []
    for budget in (30_000, 50_000, 90_000):
        res = compress(_state_dict(), tmp_path / f"{budget}.qpk", _cfg(budget=budget))
        errs.append(sum(t.est_loss for t in res.tensors))
    assert errs[0] > errs[1] > errs[2]


def test_load_returns_exact_dequantized_tensors(tmp_path):
    sd = _state_dict()
    out = tmp_path / "m.qpk"
    compress(sd, out, _cfg(budget=50_000))
    art = read_artifact(out)
    loaded = qpack.load(out)
    assert list(loaded) == list(sd)
    splits = art.meta["row_splits"]
    assert splits, "with chunk_numel=4096 the bigger matrices are stored as row blocks"
    for name in sd:
        if name == "head.weight":
            assert loaded[name] is loaded["emb.weight"]
            continue
        parts = splits[name]["parts"] if name in splits else [name]
        pieces = []
        for part in parts:
            payload = art.quantized(part)
            pieces.append(payload.dequantize() if hasattr(payload, "dequantize") else payload)
        expect = torch.cat([p.reshape(p.shape[0], -1) for p in pieces]) if len(pieces) > 1 else pieces[0]
        assert torch.equal(loaded[name].to(expect.dtype), expect.reshape(loaded[name].shape)), name
    # Small tensors pass through (fp16 by default) and come back exactly representable.
    assert torch.equal(loaded["blocks.0.norm.weight"].float(), torch.ones(64))
    assert int(loaded["step"]) == 7


def test_same_inputs_same_bytes(tmp_path):
    a, b = tmp_path / "a.qpk", tmp_path / "b.qpk"
    compress(_state_dict(), a, _cfg(budget=40_000, codecs=("ans", "zstd")))
    compress(_state_dict(), b, _cfg(budget=40_000, codecs=("ans", "zstd")))
    assert a.read_bytes() == b.read_bytes()


def test_impossible_budget_states_minimum(tmp_path):
    out = tmp_path / "m.qpk"
    with pytest.raises(BudgetError) as e:
        compress(_state_dict(), out, _cfg(budget=3_000))
    assert e.value.min_bytes and e.value.min_bytes > 3_000
    assert not out.exists()


def test_fixed_bits_without_budget(tmp_path):
    res = compress(_state_dict(), tmp_path / "m.qpk", _cfg(fixed_bits=4))
    bits = {t.bits for t in res.tensors if t.scheme != "passthrough"}
    assert bits == {4}


def test_code_bytes_count_against_budget(tmp_path):
    with_code = compress(_state_dict(), tmp_path / "a.qpk", _cfg(budget=40_000, code_bytes=10_000))
    assert with_code.bytes_total == with_code.bytes_model + 10_000 <= 40_000


def test_cli_compress_json_and_errors(tmp_path):
    sd = _state_dict()
    ckpt = tmp_path / "m.pt"
    torch.save({"model": sd, "config": None}, ckpt)
    runner = CliRunner()
    r = runner.invoke(main, ["compress", str(ckpt), "--budget", "40KB", "--codec", "ans", "--min-numel", "1024",
                             "--json", "-o", str(tmp_path / "m.qpk")])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    for key in ("bytes_total", "bytes_model", "bytes_code", "budget", "params", "bits_per_param", "tensors"):
        assert key in d
    assert d["budget"] == 40_000 and d["bytes_total"] <= 40_000
    assert d["params"] == sum(t.numel() for n, t in sd.items() if n != "head.weight")

    r = runner.invoke(main, ["compress", str(ckpt), "--budget", "2KB", "-o", str(tmp_path / "x.qpk")])
    assert r.exit_code == 2 and "smallest reachable" in r.output and not (tmp_path / "x.qpk").exists()
    r = runner.invoke(main, ["compress", str(tmp_path / "missing.pt")])
    assert r.exit_code == 2 and "missing.pt" in r.output
    r = runner.invoke(main, ["compress", str(ckpt), "--codec", "nope"])
    assert r.exit_code == 2 and "unknown codec" in r.output
    r = runner.invoke(main, ["compress", str(ckpt), "--scheme", "magic"])
    assert r.exit_code == 2 and "unknown scheme" in r.output
    r = runner.invoke(main, ["compress", str(ckpt), "--budget", "16XB"])
    assert r.exit_code == 2 and "unit" in r.output


def test_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "m.qpk"
    res = compress(_state_dict(), out, _cfg(budget=40_000), dry_run=True)
    assert not out.exists() and res.bytes_total <= 40_000


def test_original_dtypes_come_back(tmp_path):
    """A bf16 embedding and fp32 norms come back in their own dtypes (qpack.load and qpack decompress)."""
    sd = _state_dict()
    sd["emb.weight"] = sd["emb.weight"].to(torch.bfloat16)
    sd["head.weight"] = sd["emb.weight"]
    sd["blocks.0.attn.weight"] = sd["blocks.0.attn.weight"].half()
    out = tmp_path / "m.qpk"
    compress(sd, out, _cfg(budget=50_000))
    loaded = qpack.load(out)
    assert {n: t.dtype for n, t in loaded.items()} == {n: t.dtype for n, t in sd.items()}
    assert loaded["head.weight"] is loaded["emb.weight"]
    ckpt = tmp_path / "back.pt"
    r = CliRunner().invoke(main, ["decompress", str(out), "-o", str(ckpt)])
    assert r.exit_code == 0, r.output
    back = torch.load(ckpt, weights_only=True)
    back = back.get("model", back)
    assert back["emb.weight"].dtype == torch.bfloat16 and back["blocks.0.norm.weight"].dtype == torch.float32
    # The stored entries record the original dtype of quantized weights too.
    art = read_artifact(out)
    parts = art.meta["row_splits"].get("emb.weight", {"parts": ["emb.weight"]})["parts"]
    assert {art.entry(p)["dtype"] for p in parts} == {"bfloat16"}


@pytest.mark.parametrize("kw, words", [
    (dict(lqer_rank=4), "both"),
    (dict(lqer_top=2), "both"),
    (dict(sdclip_k=(12.0,)), "sdclip"),
    (dict(sdclip_k=(12.0,), scheme="gptq_lite"), "sdclip"),
])
def test_flags_that_would_do_nothing_are_errors(kw, words):
    with pytest.raises(QpackInputError, match=words):
        CompressConfig(**kw)
    CompressConfig(lqer_rank=4, lqer_top=2)
    CompressConfig(sdclip_k=(12.0,), scheme="search")


@pytest.mark.parametrize("bits", [6, (), (4, 9), (4, 6.0), (True,)])
def test_bad_candidate_widths_are_input_errors(bits):
    # an int is the usual slip for fixed_bits: a clear error, not a TypeError from inside
    with pytest.raises(QpackInputError, match="bits"):
        CompressConfig(bits=bits)
    CompressConfig(bits=[4, 6])


def test_loaded_checkpoint_compresses_like_its_path(tmp_path):
    from qpack.checkpoint import load_state_dict

    ckpt = tmp_path / "m.pt"
    torch.save({"model": _state_dict(), "config": {"arch": "none"}}, ckpt)
    compress(ckpt, tmp_path / "a.qpk", _cfg(budget=40_000))
    compress(load_state_dict(ckpt), tmp_path / "b.qpk", _cfg(budget=40_000))
    assert (tmp_path / "a.qpk").read_bytes() == (tmp_path / "b.qpk").read_bytes()
    assert read_artifact(tmp_path / "b.qpk").model_config == {"arch": "none"}
    with pytest.raises(QpackInputError):
        compress(42, tmp_path / "c.qpk", _cfg(budget=40_000))


def _count_quantizers(monkeypatch) -> dict:
    cmod = importlib.import_module("qpack.compress")  # qpack.compress is the function

    calls: dict = {}
    real = cmod.make_quantizer

    def counting(name, bits, *a, **k):
        calls[(name, bits)] = calls.get((name, bits), 0) + 1
        return real(name, bits, *a, **k)

    monkeypatch.setattr(cmod, "make_quantizer", counting)
    return calls


def test_impossible_budget_refused_before_quantizing(tmp_path, monkeypatch):
    calls = _count_quantizers(monkeypatch)
    with pytest.raises(BudgetError, match="smallest reachable") as e:
        compress(_state_dict(), tmp_path / "m.qpk", _cfg(budget=3_000))
    assert e.value.min_bytes > 3_000
    # only the quick floor ran: round-to-nearest at the fewest bits and on the coarsest uniform step
    assert {name for name, _ in calls} == {"rtn", "uniform"}, calls


def test_budget_runs_only_the_widths_it_can_use(tmp_path, monkeypatch):
    calls = _count_quantizers(monkeypatch)
    res = compress(_state_dict(), tmp_path / "m.qpk", _cfg(budget=45_000))
    real = {bits for name, bits in calls if name == "gptq_lite"}
    assert real and len(real) < len(CompressConfig().bits), calls
    assert 0.98 * 45_000 <= res.bytes_total <= 45_000


def test_lazy_widths_lose_little_against_every_width(tmp_path, monkeypatch):
    """Realizing only the widths the solver reaches for costs little estimated loss against realizing all."""
    import qpack.budget as budget
    cmod = importlib.import_module("qpack.compress")  # qpack.compress is the function

    lazy = {b: compress(_state_dict(), None, _cfg(budget=b), dry_run=True) for b in (35_000, 60_000)}

    def every_width(proxies, realized, realize, capacity, rounds=6):
        for p in proxies:
            for i in range(len(p.candidates)):
                if i not in realized.get(p.name, {}):
                    realize(p.name, i)
        return budget.realize_lazily(proxies, realized, realize, capacity, rounds)

    monkeypatch.setattr(cmod, "realize_lazily", every_width)
    for b, res in lazy.items():
        full = compress(_state_dict(), None, _cfg(budget=b), dry_run=True)
        assert res.bytes_total <= b and full.bytes_total <= b
        loss = lambda r: sum(t.est_loss for t in r.tensors)  # noqa: E731
        assert loss(res) <= 1.05 * loss(full), (b, loss(res), loss(full))


def test_table_codec_labels_are_the_short_ones(tmp_path):
    # the per-tensor table names codecs the way people write them; the manifest keeps the full spec
    res = compress(_state_dict(), tmp_path / "a.qpk", _cfg(budget=40_000, codecs=("zstd", "ans")))
    labels = {t.codec for t in res.tensors}
    assert labels <= {"zstd-19", "ans", "raw"}, labels
    assert "zstd-19" in labels or "ans" in labels

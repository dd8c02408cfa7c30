"""qpack.checkpoint: exact round trips in both formats, config/extra handling, refusals, atomic saves."""
from __future__ import annotations

import errno
import json
import os
import struct

import pytest
import torch

from qpack import checkpoint
from qpack.checkpoint import load_state_dict, read_safetensors_header, save_state_dict
from qpack.errors import QpackFormatError, QpackInputError, Reason


def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(16, 8, generator=g)
    return {
        "tok.weight": emb,
        "head.weight": emb,  # tied: the same storage under two names
        "blk.0.w": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "blk.0.norm": torch.ones(8, dtype=torch.float16),
        "pos_ids": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin", ".pth"])
def test_round_trip_exact(tmp_path, suffix):
    sd = _sd()
    cfg = {"arch": "gpt", "n_layer": 2, "rope": {"base": 10000.0}}
    path = tmp_path / f"m{suffix}"
    save_state_dict(path, sd, config=cfg, extra={"tokenizer": "sp1024.model", "data_manifest_hash": "ab12"})
    got, got_cfg, extra = load_state_dict(path)
    _same(sd, got)
    assert got_cfg == cfg
    assert extra == {"tokenizer": "sp1024.model", "data_manifest_hash": "ab12"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_bare_state_dict_and_trainer_wrapper(tmp_path):
    sd = {"w": torch.randn(3, 3)}
    torch.save(sd, tmp_path / "bare.pt")
    assert load_state_dict(tmp_path / "bare.pt")[1:] == (None, {})
    torch.save({"model": sd, "config": {"arch": "gpt"}, "step": 7, "tokenizer": "t.model",
                "optimizer": {"m": torch.zeros(2)}}, tmp_path / "wrapped.pt")
    got, cfg, extra = load_state_dict(tmp_path / "wrapped.pt")
    _same(sd, got)
    assert cfg == {"arch": "gpt"}
    assert extra == {"step": 7, "tokenizer": "t.model"}  # non-plain entries (optimizer state) are dropped


def test_state_dict_alias_key(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, tmp_path / "c.ckpt")
    got, cfg, extra = load_state_dict(tmp_path / "c.ckpt")
    assert list(got) == ["w"] and cfg is None and extra == {"epoch": 1}


def test_safetensors_written_by_the_library_loads(tmp_path):
    from safetensors.torch import save_file

    sd = {"a": torch.randn(2, 3), "b": torch.zeros(0, 4)}
    save_file(sd, tmp_path / "x.safetensors", metadata={"qpack_config": json.dumps({"arch": "gpt"}), "k": "v"})
    got, cfg, extra = load_state_dict(tmp_path / "x.safetensors")
    assert torch.equal(got["a"], sd["a"]) and got["b"].shape == (0, 4)
    assert cfg == {"arch": "gpt"} and extra == {"k": "v"}
    header, meta, start = read_safetensors_header(tmp_path / "x.safetensors")
    assert set(header) == {"a", "b"} and start == 8 + struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])[0]


def test_content_wins_over_suffix(tmp_path):
    save_state_dict(tmp_path / "x.safetensors", {"w": torch.ones(2)})
    os.rename(tmp_path / "x.safetensors", tmp_path / "x.pt")
    assert torch.equal(load_state_dict(tmp_path / "x.pt")[0]["w"], torch.ones(2))


@pytest.mark.parametrize("case,reason,text", [
    ("missing", Reason.IO, "no such file"),
    ("directory", Reason.IO, "directory"),
    ("qpk", Reason.NOT_A_MODEL, "use `qpack decompress`"),
    ("text", Reason.NOT_A_MODEL, "not a checkpoint"),
    ("int8_scales", Reason.NOT_A_MODEL, "already quantized"),
    ("qint8", Reason.NOT_A_MODEL, "already quantized"),
    ("non_tensor_entry", Reason.NOT_A_MODEL, "not a tensor"),
    ("bad_config", Reason.NOT_A_MODEL, "config"),
])
def test_refusals_name_the_file(tmp_path, case, reason, text):
    path = tmp_path / f"{case}.pt"
    if case == "directory":
        path.mkdir()
    elif case == "qpk":
        path.write_bytes(b"QPACK\x00\r\n" + bytes(100))
    elif case == "text":
        path.write_bytes(b"weights: [1, 2, 3]\n")
    elif case == "int8_scales":
        torch.save({"fc.weight": torch.zeros(4, 4, dtype=torch.int8), "fc.scales": torch.ones(4)}, path)
    elif case == "qint8":
        with pytest.warns(UserWarning):
            q = torch.quantize_per_tensor(torch.ones(2, 2), 0.1, 0, torch.qint8)
        torch.save({"w": q}, path)
    elif case == "non_tensor_entry":
        torch.save({"model": {"w": torch.ones(2), "x": [1, 2]}}, path)
    elif case == "bad_config":
        torch.save({"model": {"w": torch.ones(2)}, "config": "gpt"}, path)
    with pytest.raises(QpackFormatError) as info:
        load_state_dict(path)
    assert info.value.reason is reason
    assert str(path) in str(info.value) and text in str(info.value)


def test_integer_buffers_without_scales_are_not_quantized(tmp_path):
    sd = {"emb.weight": torch.randn(4, 4), "ids": torch.zeros(3, 3, dtype=torch.uint8),
          "bn.num_batches_tracked": torch.tensor(5)}
    save_state_dict(tmp_path / "m.pt", sd)
    _same(sd, load_state_dict(tmp_path / "m.pt")[0])


def test_safetensors_header_is_checked_before_the_library(tmp_path, monkeypatch):
    """A header whose offsets overlap is refused by qpack's own check, not by the library."""
    body = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(12))
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("library reached"))
    with pytest.raises(QpackFormatError) as info:
        load_state_dict(path)
    assert info.value.reason is Reason.LAYOUT


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_state_dict(path, {"w": torch.ones(3)})
    old = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    for target in (path, tmp_path / "new.safetensors"):
        with pytest.raises(QpackFormatError) as info:
            save_state_dict(target, {"w": torch.zeros(3)})
        assert info.value.reason is Reason.IO and "No space left" in str(info.value)
        assert "\n" not in str(info.value)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(QpackInputError):
        save_state_dict(tmp_path / "m.npz", {"w": torch.ones(1)})
    with pytest.raises(QpackInputError):
        save_state_dict(tmp_path / "m.pt", {"w": torch.ones(1)}, extra={"model": 1})
    with pytest.raises(QpackFormatError):
        save_state_dict(tmp_path / "m.pt", {"w": [1.0]})
    assert list(tmp_path.iterdir()) == []


def test_never_calls_torch_load_without_weights_only(tmp_path, monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    load_state_dict(tmp_path / "a.pt")
    (tmp_path / "b.pt").write_bytes(b"\x80\x02cos\nsystem\nX\x01\x00\x00\x00x\x85R.")
    with pytest.raises(QpackFormatError):
        load_state_dict(tmp_path / "b.pt")
    assert calls == [True]

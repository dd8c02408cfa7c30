"""The exported loader, run where qpack and constriction cannot be imported, gives qpack.load's tensors bit for bit."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import qpack
from qpack.cli import main
from qpack.compress import compress
from qpack.loader import export_loader

GOLDEN = Path(__file__).resolve().parent / "reliability" / "golden"
ATTACKS = sorted((Path(__file__).resolve().parent / "reliability" / "attacks").glob("*/*.qpk"))
CODECS = ("ans", "ans_ctx", "ans_cols", "zstd", "lzma", "brotli", "zlib", "raw")

# Runs with `python -I -S`: no site-packages processing (so no editable qpack finder), then only the
# interpreter's own site-packages for numpy/torch, and a finder that refuses qpack, trainers and constriction.
RUNNER = r'''
import hashlib, importlib.util, json, sys
sys.path.append(sys.argv[1])
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("qpack", "trainers", "constriction"):
            raise ImportError(f"{name} is not available here")
sys.meta_path.insert(0, Block())
try:
    import qpack
    qpack_importable = True
except ImportError:
    qpack_importable = False
import torch
spec = importlib.util.spec_from_file_location("qpack_load", sys.argv[2])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
results = {}
for path in json.loads(sys.argv[3]):
    try:
        sd = mod.load(path)
    except mod.QpkLoadError as exc:
        results[path] = {"error": type(exc).__name__, "message": str(exc)}
        continue
    out = []
    for k, t in sd.items():
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        out.append([k, str(t.dtype), list(t.shape), hashlib.sha256(raw.contiguous().numpy().tobytes()).hexdigest()])
    results[path] = {"tensors": out}
banned = sorted(m for m in sys.modules if m.split(".")[0] in ("qpack", "trainers", "constriction"))
print(json.dumps({"qpack_importable": qpack_importable, "banned_modules": banned, "results": results}))
'''


def fingerprint(sd: dict[str, torch.Tensor]) -> list:
    """[name, dtype, shape, sha256 of the raw bytes] in dict order: equal lists mean bit-identical state dicts."""
    out = []
    for k, t in sd.items():
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        out.append([k, str(t.dtype), list(t.shape), hashlib.sha256(raw.contiguous().numpy().tobytes()).hexdigest()])
    return out


def state_dict() -> dict[str, torch.Tensor]:
    """A small model with everything compress produces: row blocks, a tied weight, passthrough dtypes."""
    g = torch.Generator().manual_seed(3)
    emb = torch.distributions.Laplace(0.0, 0.05).sample((128, 64))
    sd = {
        "tok_emb.weight": emb,
        "blocks.0.fc.weight": torch.randn(96, 64, generator=g) * 0.05,
        "blocks.0.proj.weight": torch.randn(64, 96, generator=g).to(torch.bfloat16) * 0.05,
        "blocks.0.norm.weight": torch.rand(64, generator=g),
        "steps": torch.arange(5, dtype=torch.int64),
    }
    sd["lm_head.weight"] = sd["tok_emb.weight"]  # tied: stored once, restored as an alias
    return sd


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Artifacts for each codec, the goldens and corrupted copies, all loaded in one isolated subprocess."""
    tmp = tmp_path_factory.mktemp("loader")
    sd = state_dict()
    numel = sum(t.numel() for k, t in sd.items() if k != "lm_head.weight")
    arts = {}
    for codec in CODECS:
        path = tmp / f"{codec}.qpk"
        budget = int(numel * (1.2 if codec == "raw" else 4.5 / 8)) + 8000  # raw stores a byte per code
        compress(sd, path, budget=budget, codecs=(codec,), chunk_numel=2048,
                       lqer_rank=2, lqer_top=1)
        arts[codec] = path
    # data-free with a final norm's gain before the tied head: the embedding's grid is column-scaled (col_scale)
    arts["headcols"] = tmp / "headcols.qpk"
    gained = {**sd, "output_norm.weight": torch.exp(torch.randn(64, generator=torch.Generator().manual_seed(5)))}
    compress(gained, arts["headcols"], budget=int(numel * 4 / 8) + 8000, codecs=("ans", "zstd"), chunk_numel=2048)
    # a budget above int8's (10 bits/param) on uniform steps: the solver takes codes past 8 bits (layout planes)
    arts["wide"] = tmp / "wide.qpk"
    compress(sd, arts["wide"], budget=int(numel * 10 / 8) + 8000, scheme="uniform", codecs=("ans", "zstd"),
             chunk_numel=2048)
    goldens = sorted(GOLDEN.glob("*.qpk"))
    data = (GOLDEN / "ans.qpk").read_bytes()
    bad = {}
    for label, blob in {
        "flip_header": data[:10] + bytes([data[10] ^ 1]) + data[11:],
        "flip_manifest": data[:40] + bytes([data[40] ^ 0x10]) + data[41:],
        "flip_payload": data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0x80]) + data[len(data) // 2 + 1 :],
        "flip_trailer": data[:-3] + bytes([data[-3] ^ 1]) + data[-2:],
        "truncated_half": data[: len(data) // 2],
        "truncated_one": data[:-1],
        "trailing": data + b"\0",
        "empty": b"",
    }.items():
        bad[label] = tmp / f"bad_{label}.qpk"
        bad[label].write_bytes(blob)
    loader = tmp / "qpack_load.py"
    loader.write_bytes(export_loader(list(CODECS)).shipped)
    ans_only = tmp / "qpack_load_ans.py"
    ans_only.write_bytes(export_loader(["ans"]).shipped)
    runner = tmp / "runner.py"
    runner.write_text(RUNNER)
    purelib = sysconfig.get_paths()["purelib"]
    paths = [str(p) for p in [*arts.values(), *goldens, *bad.values(), *ATTACKS]]

    def go(loader_path, which):
        proc = subprocess.run([sys.executable, "-I", "-S", str(runner), purelib, str(loader_path), json.dumps(which)],
                              capture_output=True, text=True, cwd=tmp, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    return {"out": go(loader, paths), "ans_only": go(ans_only, [str(arts["zstd"]), str(arts["ans"])]),
            "arts": arts, "goldens": goldens, "bad": bad}


def test_loader_runs_without_qpack_or_constriction(run):
    assert run["out"]["qpack_importable"] is False
    assert run["out"]["banned_modules"] == []
    assert run["ans_only"]["banned_modules"] == []


@pytest.mark.parametrize("codec", CODECS)
def test_bit_identical_to_qpack_load(run, codec):
    path = run["arts"][codec]
    art = qpack.artifact.read_artifact(path)
    used = {s.codec["name"] for s in art.container.sections}
    assert codec in used and used <= {codec, "raw"}
    assert art.meta["aliases"] and art.meta["row_splits"]  # the artifact exercises both
    assert any(e.get("lowrank") for e in art.entries)
    got = run["out"]["results"][str(path)]
    assert "error" not in got, got
    assert got["tensors"] == fingerprint(qpack.load(path))


def test_wide_codes_decode_bit_exact(run):
    path = run["arts"]["wide"]
    art = qpack.artifact.read_artifact(path)
    wide = [e for e in art.entries if e.get("kind") == "quant" and e["bits"] > 8]
    assert wide and all(e["layout"] == "planes" for e in wide)
    got = run["out"]["results"][str(path)]
    assert "error" not in got, got
    assert got["tensors"] == fingerprint(qpack.load(path))


def test_column_scales_decode_bit_exact(run):
    path = run["arts"]["headcols"]
    art = qpack.artifact.read_artifact(path)
    scaled = [e["name"] for e in art.entries if "col_scale" in e]
    assert scaled and all(n.startswith("tok_emb.weight") for n in scaled)  # every row block of the embedding
    got = run["out"]["results"][str(path)]
    assert "error" not in got, got
    assert got["tensors"] == fingerprint(qpack.load(path))


@pytest.mark.parametrize("name", sorted(p.name for p in GOLDEN.glob("*.qpk")))
def test_goldens_decode_bit_exact(run, name):
    want = json.loads((GOLDEN / "golden.json").read_text())[name]["tensors"]
    got = run["out"]["results"][str(GOLDEN / name)]["tensors"]
    # Hashes computed independently when the goldens were made (tests/reliability/make_golden.py).
    assert {k: [d.removeprefix("torch."), s, h] for k, d, s, h in got} == \
        {k: [v["dtype"], v["shape"], v["sha256"]] for k, v in want.items()}
    assert got == fingerprint(qpack.load(GOLDEN / name))


@pytest.mark.parametrize("label", ["flip_header", "flip_manifest", "flip_payload", "flip_trailer",
                                   "truncated_half", "truncated_one", "trailing", "empty"])
def test_corrupt_copies_raise_the_loader_error(run, label):
    got = run["out"]["results"][str(run["bad"][label])]
    assert got.get("error") == "QpkLoadError", got
    with pytest.raises(qpack.QpackFormatError):
        qpack.load(run["bad"][label])


def test_hostile_files_are_refused_like_the_library_refuses_them(run):
    # tests/reliability/attacks: bombs, lying sizes, bad tiling, bad params, deep JSON... (qpack refuses each one)
    assert len(ATTACKS) > 50
    got = {p.name: run["out"]["results"][str(p)].get("error") for p in ATTACKS}
    assert got == {p.name: "QpkLoadError" for p in ATTACKS}


def test_loader_without_a_codec_refuses_its_sections(run):
    res = run["ans_only"]["results"]
    assert res[str(run["arts"]["zstd"])]["error"] == "QpkLoadError"
    assert "--codecs" in res[str(run["arts"]["zstd"])]["message"]
    assert res[str(run["arts"]["ans"])]["tensors"] == fingerprint(qpack.load(run["arts"]["ans"]))


def test_cli_writes_the_shipped_loader_for_an_artifact(tmp_path):
    from click.testing import CliRunner

    out = tmp_path / "qpack_load.py"
    res = CliRunner().invoke(main, ["export-loader", "-o", str(out), "--for", str(GOLDEN / "ans.qpk"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["codecs"] == ["raw", "ans"] and rep["bytes"] == out.stat().st_size == rep["bytes_shipped"]
    assert rep["bytes_shipped"] < rep["bytes_source"] / 3
    assert out.read_bytes().count(b"\n") == 2  # the two-line stub
    from qpack.compress import code_size

    assert code_size([out], None) == rep["bytes"]  # what `qpack compress --code` counts
    bad = CliRunner().invoke(main, ["export-loader", "-o", str(tmp_path / "x.py"), "--codecs", "ans,nope"])
    assert bad.exit_code == 2 and "nope" in bad.output and not (tmp_path / "x.py").exists()

"""Part 7: golden artifacts decode bit-exactly forever; the same inputs give the same bytes in fresh processes."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from qpack.artifact import build_artifact, read_artifact, write_artifact
from relhelp import GOLDEN, run_py

INDEX = json.loads((GOLDEN / "golden.json").read_text())
FILES = sorted(k for k in INDEX if k.endswith(".qpk"))
META = {"libraries": {}, "qpack_version": "golden", "model_config": {"arch": "none"}}


def _tensor_sha(t: torch.Tensor) -> str:
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return hashlib.sha256(raw.contiguous().numpy().tobytes()).hexdigest()


def test_one_golden_per_builtin_codec():
    from qpack.codecs import codec_names

    assert {INDEX[f]["codec"] for f in FILES} == {"raw", "zlib", "zstd", "lzma", "brotli", "ans"} <= set(codec_names())
    assert all((GOLDEN / f).stat().st_size <= 64 * 1024 for f in FILES)


@pytest.mark.parametrize("name", FILES)
def test_golden_decodes_bit_exact(name):
    data = (GOLDEN / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == INDEX[name]["file_sha256"], "golden files are never rewritten"
    tensors = read_artifact(GOLDEN / name).tensors()
    want = INDEX[name]["tensors"]
    assert sorted(tensors) == sorted(want)
    for key, t in tensors.items():
        assert str(t.dtype).removeprefix("torch.") == want[key]["dtype"], key
        assert list(t.shape) == want[key]["shape"], key
        assert _tensor_sha(t) == want[key]["sha256"], key


@pytest.mark.parametrize("name", FILES)
def test_reencoding_today_decodes_to_the_golden_tensors(name):
    """The encoder may change its bytes between versions (better parameters); never what they decode to."""
    from make_golden import golden_entries
    from qpack.artifact import loads_artifact

    entries, _ = golden_entries(INDEX[name]["codec"])
    tensors = loads_artifact(build_artifact(entries, META)).tensors()
    assert {k: _tensor_sha(t) for k, t in tensors.items()} == {k: v["sha256"] for k, v in INDEX[name]["tensors"].items()}


_BUILD_ALL = r"""
import hashlib, sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
from make_golden import CODECS, golden_entries
from qpack.artifact import build_artifact
for codec in CODECS:
    entries, _ = golden_entries(codec)
    print(codec, hashlib.sha256(build_artifact(entries, {"qpack_version": "x"})).hexdigest())
"""


def test_byte_identical_across_fresh_processes(tmp_path):
    """Hash seed and thread count vary; the bytes (library versions recorded in meta included) do not."""
    from relhelp import HERE

    from concurrent.futures import ThreadPoolExecutor

    def one(seed_threads):
        seed, threads = seed_threads
        return run_py(_BUILD_ALL, str(HERE), threads, env={"PYTHONHASHSEED": seed, "OMP_NUM_THREADS": threads})

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, [("1", "1"), ("12345", "2")]))
    for res in results:
        assert res.returncode == 0, res.stderr[-2000:]
    assert results[0].stdout == results[1].stdout and len(results[0].stdout.splitlines()) == 6


def test_write_twice_identical_and_meta_records_libraries(tmp_path):
    from make_golden import golden_entries

    entries, _ = golden_entries("zstd")
    a, b = tmp_path / "a.qpk", tmp_path / "b.qpk"
    write_artifact(a, entries, {"qpack_version": "x"})
    write_artifact(b, entries, {"qpack_version": "x"})
    assert a.read_bytes() == b.read_bytes()
    libs = read_artifact(a).meta["libraries"]
    assert {"zstandard", "brotli", "constriction", "liblzma", "zlib"} <= set(libs)

"""Part 3: small hostile .qpk files, each refused with the reason its index names, within file size + 64 MiB.

The files and attacks/qpk/index.json come from make_attacks.py. Each passes the checksums (they are
re-sealed), so the check that refuses it is the one behind them. Memory is measured in a fresh process.
"""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from qpack.artifact import read_artifact
from qpack.errors import QpackFormatError
from relhelp import ATTACKS, ROOT, load_index, record, run_py

FOLDER = ATTACKS / "qpk"
INDEX = load_index(FOLDER)
MIB = 2**20


def test_enough_attacks_and_index_matches_files():
    assert len(INDEX) >= 40
    assert sorted(p.name for p in FOLDER.iterdir() if p.suffix == ".qpk") == sorted(INDEX)
    assert max((FOLDER / n).stat().st_size for n in INDEX) < 64 * 1024


def test_base_artifact_is_valid():
    """The files are mutations of this one; it must load, or every refusal below proves nothing."""
    t = read_artifact(FOLDER / "base.qpk.ok").tensors()
    assert sorted(t) == ["b", "w"] and t["w"].shape == (4, 8)


@pytest.mark.parametrize("name", sorted(INDEX))
def test_refused_with_expected_reason(name):
    path = FOLDER / name
    with pytest.raises(QpackFormatError) as info:
        read_artifact(path).tensors()
    err = info.value
    assert err.reason.value == INDEX[name]["reason"], f"{name}: {err}"
    assert str(path) in str(err) and "\n" not in str(err)


def test_memory_bounded_in_fresh_process():
    """Each file is refused having allocated at most its size + 64 MiB (tracemalloc and peak RSS)."""
    files = [str(FOLDER / n) for n in sorted(INDEX)]
    code = f"import runpy, sys; sys.argv = ['probe', 'artifact', *sys.argv[1:], '--as-limit-mib', '2048']; " \
           f"runpy.run_path({str(ROOT / 'tests/reliability/probe.py')!r}, run_name='__main__')"
    res = run_py(code, *files, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(files)
    for row in rows:
        assert row["outcome"] == "refused", row
        assert row["reason"] == INDEX[row["file"]]["reason"], row
        assert row["py_peak"] <= row["file_size"] + 64 * MIB, row
        assert row["seconds"] < 2, row
    biggest = max(r["file_size"] for r in rows)
    record("3 hostile", files=len(rows), max_py_peak=max(r["py_peak"] for r in rows),
           max_rss_growth=max(r["rss_growth"] for r in rows), max_seconds=max(r["seconds"] for r in rows))
    assert max(r["rss_growth"] for r in rows) <= biggest + 64 * MIB


def _manifest_is_fine(path) -> bool:
    try:
        read_artifact(path)
    except QpackFormatError:
        return False
    return True


@pytest.mark.parametrize("verb", ["inspect", "decompress"])
def test_cli_one_line_exit_2(verb, tmp_path):
    from qpack.cli import main

    runner = CliRunner()
    for name in sorted(INDEX):
        if verb == "inspect" and _manifest_is_fine(FOLDER / name):
            continue  # inspect reads the manifest only; these files are refused when their data is decoded
        args = [verb, str(FOLDER / name)] + (["-o", str(tmp_path / "out.pt")] if verb == "decompress" else [])
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (name, result.output, result.exception)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("qpack: error: "), (name, result.stderr)
        assert os.listdir(tmp_path) == [], name


@pytest.mark.slow
def test_generator_reproduces_the_committed_files(tmp_path, monkeypatch):
    """make_attacks.py still writes exactly the committed attack files (same torch and codec versions)."""
    import make_attacks

    monkeypatch.setattr(make_attacks, "ATTACKS", tmp_path)
    make_attacks.main()
    for folder in ("checkpoints", "qpk", "bombs"):
        made = {p.name: p.read_bytes() for p in (tmp_path / folder).iterdir()}
        kept = {p.name: p.read_bytes() for p in (ATTACKS / folder).iterdir()}
        assert sorted(made) == sorted(kept), folder
        assert [n for n in made if made[n] != kept[n]] == [], folder

"""Part 4: decompression bombs. Each section must stop by its declared size, within 2 s and within twice
the declared size + 64 MiB of memory, measured in a fresh process per bomb (peak RSS only rises)."""
from __future__ import annotations

import json

import pytest

from relhelp import ATTACKS, ROOT, load_index, record, run_py

FOLDER = ATTACKS / "bombs"
INDEX = load_index(FOLDER)
MIB = 2**20
#: Bombs that break a limit, with where the fix belongs. All three found so far (ANS group tables, raw LZMA2
#: dictionary) were fixed in qpack/codecs (commits 16b68ac, 4fcaacc); add new ones here as xfail.
KNOWN: dict[str, str] = {}


def test_enough_bombs():
    assert len(INDEX) >= 12
    assert sorted(p.name for p in FOLDER.iterdir() if p.suffix == ".qpk") == sorted(INDEX)


def _probe(name: str) -> dict:
    code = (f"import runpy, sys; sys.argv = ['probe', 'container', sys.argv[1], '--as-limit-mib', '3072']; "
            f"runpy.run_path({str(ROOT / 'tests/reliability/probe.py')!r}, run_name='__main__')")
    res = run_py(code, str(FOLDER / name), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=f"finding: {KNOWN[n]}"))
                                  if n in KNOWN else n for n in sorted(INDEX)])
def test_bomb_stops_at_declared_size(name):
    row = _probe(name)
    record("4 bomb", **row)
    declared = INDEX[name]["raw_length"]
    assert row["outcome"] == "refused", row
    assert row["reason"] in ("codec", "bomb") and "out of memory" not in row["message"], row
    assert row["seconds"] < 2.0, row
    budget = 2 * declared + 64 * MIB
    assert row["py_peak"] <= budget and row["rss_growth"] <= budget, row

"""Part 5: checkpoints that try to run code, and safetensors files with broken headers.

Every file in attacks/checkpoints/ must be refused with the reason in its index, in one line naming the file,
and no payload may ever run: each would create ./CANARY, which must never appear. A control test runs the
same payloads through a full unpickler in a throwaway directory to prove that they are live.
"""
from __future__ import annotations

import json
import os
import time

import pytest
from click.testing import CliRunner

from qpack import checkpoint
from qpack.checkpoint import load_state_dict
from qpack.errors import QpackFormatError, Reason
from relhelp import ATTACKS, load_index, run_py

FOLDER = ATTACKS / "checkpoints"
INDEX = load_index(FOLDER)
CODE_RUNNERS = sorted(n for n, v in INDEX.items() if v["runs_code"])
OTHERS = sorted(n for n, v in INDEX.items() if not v["runs_code"])


def test_enough_attacks():
    assert len(CODE_RUNNERS) >= 15
    assert sum(n.endswith(".safetensors") for n in INDEX) >= 15
    assert sorted(p.name for p in FOLDER.iterdir() if p.name != "index.json") == sorted(INDEX)


def _refusal(path, cwd) -> QpackFormatError:
    before = set(os.listdir(cwd))
    with pytest.raises(QpackFormatError) as info:
        load_state_dict(path)
    time.sleep(0.05)  # a payload spawning a process would have created its file by now
    assert set(os.listdir(cwd)) == before, "a payload ran: the working directory changed"
    err = info.value
    assert "\n" not in str(err)
    assert str(path) in str(err)
    return err


@pytest.mark.parametrize("name", CODE_RUNNERS)
def test_code_running_pickle_is_refused(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _refusal(FOLDER / name, tmp_path)
    assert err.reason is Reason.UNSAFE
    assert "refused" in str(err)
    assert not (tmp_path / "CANARY").exists()


@pytest.mark.parametrize("name", OTHERS)
def test_bad_checkpoint_is_refused(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _refusal(FOLDER / name, tmp_path)
    assert err.reason.value == INDEX[name]["reason"], str(err)


def test_named_globals_are_reported():
    """The message names what the pickle would call, where it can be read from the opcodes."""
    expect = {"os_system.pt": "os.system", "posix_system.pt": "posix.system", "builtins_eval.pth": "builtins.eval",
              "subprocess_popen.pt": "subprocess.Popen", "stack_global_memo.pt": "posix.system",
              "torch_load_from_bytes.pt": "torch.storage._load_from_bytes",
              "torch_zip_hidden_entry.bin": "os.system", "torch_legacy_system.pt": "os.system"}
    for name, dotted in expect.items():
        with pytest.raises(QpackFormatError, match=f"tries to call {dotted.replace('.', '[.]')}"):
            load_state_dict(FOLDER / name)


@pytest.mark.parametrize("name", CODE_RUNNERS)
def test_weights_only_is_the_barrier_without_the_scan(name, tmp_path, monkeypatch):
    """With qpack's own opcode scan switched off, torch.load(weights_only=True) must still refuse."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint, "_refuse_unsafe_pickles", lambda path: None)
    err = _refusal(FOLDER / name, tmp_path)
    assert err.reason in (Reason.UNSAFE, Reason.NOT_A_MODEL), str(err)
    assert not (tmp_path / "CANARY").exists()


def test_widened_torch_allowlist_does_not_widen_qpack(tmp_path, monkeypatch):
    """Code elsewhere in the process may call torch.serialization.add_safe_globals; qpack ignores that."""
    import torch

    monkeypatch.chdir(tmp_path)
    with torch.serialization.safe_globals([os.system]):
        err = _refusal(FOLDER / "os_system.pt", tmp_path)
    assert err.reason is Reason.UNSAFE
    assert not (tmp_path / "CANARY").exists()


def test_no_fallback_env_override(tmp_path):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD must not turn qpack's loads into full unpickling (fresh process)."""
    code = ("import sys, json; from qpack.checkpoint import load_state_dict\n"
            "from qpack.errors import QpackFormatError\n"
            "out = {}\n"
            "for p in sys.argv[1:]:\n"
            "    try: load_state_dict(p); out[p] = 'loaded'\n"
            "    except QpackFormatError as e: out[p] = e.reason.value\n"
            "print(json.dumps(out))\n")
    files = [str(FOLDER / n) for n in CODE_RUNNERS]
    res = run_py(code, *files, cwd=tmp_path, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert res.returncode == 0, res.stderr
    assert set(json.loads(res.stdout.strip().splitlines()[-1]).values()) == {"unsafe"}
    assert os.listdir(tmp_path) == []


def test_payloads_are_live(tmp_path):
    """Control: a full unpickler (what qpack never uses) does run each payload, creating CANARY."""
    code = r"""
import io, os, pickle, sys, time, zipfile, torch
for path in sys.argv[1:]:
    d = os.path.join(os.getcwd(), os.path.basename(path) + ".d")
    os.mkdir(d); os.chdir(d)
    data = open(path, "rb").read()
    try:
        if zipfile.is_zipfile(path) or path.endswith("torch_legacy_system.pt"):
            torch.load(path, weights_only=False)
        else:
            pickle.loads(data)
    except Exception:
        pass  # the payload ran before the loader choked on what it returned
    for _ in range(100):
        if os.path.exists("CANARY"):
            break
        time.sleep(0.02)
    print(os.path.basename(path), os.path.exists("CANARY"))
    os.chdir("..")
"""
    res = run_py(code, *[str(FOLDER / n) for n in CODE_RUNNERS], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    ran = dict(line.split() for line in res.stdout.strip().splitlines())
    assert ran == {n: "True" for n in CODE_RUNNERS}


@pytest.mark.parametrize("name", sorted(INDEX))
def test_cli_compress_refuses_in_one_line(name, tmp_path, monkeypatch):
    from qpack.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.qpk"
    result = CliRunner().invoke(main, ["compress", str(FOLDER / name), "--budget", "1MB", "-o", str(out), "-q"])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("qpack: error: ") and name in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert sorted(os.listdir(tmp_path)) == [], "no output, no temp file, no canary"

"""Part 6: crash-safe writes. A SIGKILL at any moment, a full disk, or writers racing on one path never
leave a partial artifact: the target is absent, the old complete file, or the new complete file.

Random kills go through zygote.py, which imports qpack once and forks a child per run, so 50 kills of
`qpack compress` (the CLI code path, in its own process) fit the normal run; the long pass adds 200 more,
200 kills of a bare container writer and 20 kills of freshly started `python -m qpack.cli compress`.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from qpack import container
from qpack.container import build_container, encode_section, parse_container, write_container
from qpack.codecs import make_codec
from qpack.errors import QpackFormatError, Reason
from relhelp import HERE, PY, ROOT, record

STEPS = ["temp_created", "data_written", "fsynced", "replaced", "dir_fsynced"]
CI_WRITER_KILLS, LONG_WRITER_KILLS = 30, 200
CI_COMPRESS_KILLS, LONG_COMPRESS_KILLS = 50, 200

WRITER = r"""
import os, signal, sys
from qpack.container import write_container, encode_section
from qpack.codecs import make_codec
target, tag, size, step, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
payload = (tag.encode() * (size // len(tag) + 1))[:size]
secs = [encode_section("a", make_codec("raw"), payload), encode_section("b", make_codec("zlib", {"level": 1}), payload)]
def hook(name):
    if name == step:
        os.kill(os.getpid(), signal.SIGKILL)
print("ready", flush=True)
for _ in range(repeat):
    write_container(target, {"tag": tag}, [], secs, _on_step=hook)
"""


def expected(tag: str, size: int) -> bytes:
    payload = (tag.encode() * (size // len(tag) + 1))[:size]
    secs = [encode_section("a", make_codec("raw"), payload),
            encode_section("b", make_codec("zlib", {"level": 1}), payload)]
    return build_container({"tag": tag}, [], secs)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}


def _writer(target, tag: str, size: int, step: str = "-", repeat: int = 1) -> subprocess.Popen:
    return subprocess.Popen([PY, "-c", WRITER, str(target), tag, str(size), step, str(repeat)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _temps(folder) -> list[str]:
    return [p for p in os.listdir(folder) if p.endswith(".tmp")]


def _state(target, old: bytes | None, new: bytes) -> str:
    if not os.path.exists(target):
        assert old is None, "the old file vanished"
        return "absent"
    data = open(target, "rb").read()
    if data == new:
        return "new"
    assert data == old, f"partial or foreign file: {len(data)} bytes"
    return "old"


@pytest.mark.parametrize("with_old", [True, False], ids=["replacing", "fresh"])
@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_named_step(tmp_path, step, with_old):
    target = tmp_path / "m.qpk"
    old = expected("old", 5000) if with_old else None
    if old:
        target.write_bytes(old)
    new = expected("new", 7000)
    proc = _writer(target, "new", 7000, step)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    state = _state(target, old, new)
    before_replace = STEPS.index(step) < STEPS.index("replaced")
    assert state == ("new" if not before_replace else "old" if with_old else "absent")


class Zygote:
    """zygote.py: imports once, forks a child per job; the test SIGKILLs the child at a chosen moment."""

    def __init__(self):
        self.proc = subprocess.Popen([PY, str(HERE / "zygote.py")], env=_env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, job: dict, kill_after: float | None = None) -> tuple[int, float]:
        """Start a job; kill it after `kill_after` s (None: let it finish). Returns (wait status, seconds)."""
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        t0 = time.perf_counter()
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = int(self.proc.stdout.readline().split()[1])
        return status, time.perf_counter() - t0

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def _random_kills(tmp_path, job: dict, reference_of, old: bytes, n: int, seed: int) -> dict[str, int]:
    """Kill `job` n times at uniform moments over its run time; the target must be old/absent/new, whole."""
    target = job["target"] if job["kind"] == "writer" else job["args"][job["args"].index("-o") + 1]
    zygote = Zygote()
    try:
        status, span = zygote.run(job)  # one uninterrupted run: its time and its (reference) output
        assert status == 0 and not _temps(tmp_path), "a completed run failed or left a temp file"
        new = reference_of(open(target, "rb").read())
        rng = random.Random(seed)
        seen = {"absent": 0, "old": 0, "new": 0}
        for i in range(n):
            for leftover in _temps(tmp_path):  # a killed writer cannot clean up; start each round clean
                os.unlink(tmp_path / leftover)
            with_old = i % 2 == 0
            if with_old:
                open(target, "wb").write(old)
            elif os.path.exists(target):
                os.unlink(target)
            # Half the kills anywhere in the run, half near its end, where the file is written.
            moment = rng.uniform(0, 1.1) if rng.random() < 0.5 else rng.uniform(0.8, 1.05)
            zygote.run(job, kill_after=moment * span)
            seen[_state(target, old if with_old else None, new)] += 1
    finally:
        zygote.close()
    return seen


def _writer_kills(tmp_path, n: int, seed: int) -> dict[str, int]:
    size = 3 * 2**20
    job = {"kind": "writer", "target": str(tmp_path / "m.qpk"), "tag": "new", "size": size}
    want = expected("new", size)

    def reference_of(data: bytes) -> bytes:
        assert data == want
        return data

    return _random_kills(tmp_path, job, reference_of, expected("old", size), n, seed)


def test_random_sigkill_of_a_writer(tmp_path):
    seen = _writer_kills(tmp_path, CI_WRITER_KILLS, seed=7)
    assert sum(seen.values()) == CI_WRITER_KILLS
    record("6 kills", what="container writer", **seen)


@pytest.mark.slow
def test_random_sigkill_of_a_writer_long(tmp_path):
    seen = _writer_kills(tmp_path, LONG_WRITER_KILLS, seed=11)
    record("6 kills long", what="container writer", **seen)


# ------------------------------------------------------------------------------------------ qpack compress
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from qpack.checkpoint import save_state_dict

    folder = tmp_path_factory.mktemp("ckpt")
    g = torch.Generator().manual_seed(0)
    sd = {f"l{i}.weight": torch.randn(96, 128, generator=g) for i in range(3)}
    sd["norm"] = torch.ones(128)
    save_state_dict(folder / "m.pt", sd)
    return folder / "m.pt"


def _compress_args(ckpt, out) -> list[str]:
    return ["compress", str(ckpt), "-o", str(out), "--bits", "4", "--codec", "zstd:level=3", "-q"]


def _compress_kills(tmp_path, ckpt, n: int, seed: int) -> dict[str, int]:
    job = {"kind": "cli", "args": _compress_args(ckpt, tmp_path / "m.qpk")}

    def reference_of(data: bytes) -> bytes:
        parse_container(data)
        return data  # compress is deterministic: every complete output equals this one

    return _random_kills(tmp_path, job, reference_of, expected("old", 1000), n, seed)


def test_sigkill_qpack_compress(tmp_path, tiny_checkpoint):
    seen = _compress_kills(tmp_path, tiny_checkpoint, CI_COMPRESS_KILLS, seed=3)
    assert sum(seen.values()) == CI_COMPRESS_KILLS
    record("6 kills", what="qpack compress", **seen)


@pytest.mark.slow
def test_sigkill_qpack_compress_long(tmp_path, tiny_checkpoint):
    seen = _compress_kills(tmp_path, tiny_checkpoint, LONG_COMPRESS_KILLS, seed=5)
    record("6 kills long", what="qpack compress", **seen)


@pytest.mark.slow
def test_sigkill_fresh_qpack_compress_processes(tmp_path, tiny_checkpoint):
    """The same through `python -m qpack.cli` started afresh each time (imports included in the window)."""
    out = tmp_path / "m.qpk"
    cmd = [PY, "-m", "qpack.cli", *_compress_args(tiny_checkpoint, out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=_env(), check=True, capture_output=True, timeout=300)
    span, reference = time.perf_counter() - t0, out.read_bytes()
    rng = random.Random(9)
    for _ in range(20):
        for leftover in _temps(tmp_path):
            os.unlink(tmp_path / leftover)
        out.unlink(missing_ok=True)
        p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3 * span, 1.1 * span))
        p.kill()
        p.wait(60)
        _state(out, None, reference)
    record("6 kills long", what="fresh qpack compress processes", kills=20)


# ------------------------------------------------------------------------------------------ disk full
def test_injected_enospc_gives_one_line_and_no_output(tmp_path, monkeypatch):
    target = tmp_path / "m.qpk"
    secs = [encode_section("a", make_codec("raw"), b"x" * 1000)]
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(container.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(QpackFormatError) as info:
        write_container(target, {}, [], secs)
    assert info.value.reason is Reason.IO and "No space left" in str(info.value) and "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_file_size_limit_on_qpack_compress(tmp_path, tiny_checkpoint):
    """A real short write: RLIMIT_FSIZE makes the kernel refuse bytes past 4 KB (EFBIG), as a full disk would."""
    import resource

    out = tmp_path / "m.qpk"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    res = subprocess.run([PY, "-m", "qpack.cli", *_compress_args(tiny_checkpoint, out)], env=_env(), capture_output=True, text=True,
                         timeout=300, preexec_fn=limit)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("qpack: error: ") and "Traceback" not in res.stderr, res.stderr
    assert os.listdir(tmp_path) == [], "no output and no temp file"


def test_cli_enospc_one_line(tmp_path, tiny_checkpoint, monkeypatch):
    from qpack.cli import main

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(container.os, "fsync", full)
    out = tmp_path / "m.qpk"
    result = CliRunner().invoke(main, _compress_args(tiny_checkpoint, out))
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "No space left" in lines[0], result.stderr
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ concurrency
def test_concurrent_writers_never_tear_a_file(tmp_path):
    target = tmp_path / "m.qpk"
    sizes = {"aa": 200_000, "bbb": 900_000, "c": 50_000}
    valid = {expected(tag, size) for tag, size in sizes.items()}
    writers = [_writer(target, tag, size, repeat=25) for tag, size in sizes.items()]
    reads = 0
    while any(w.poll() is None for w in writers):
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            continue
        assert data in valid, f"torn read: {len(data)} bytes"
        parse_container(data)
        reads += 1
    for w in writers:
        assert w.returncode == 0, w.stderr.read()
    assert target.read_bytes() in valid and not _temps(tmp_path)
    assert reads > 10

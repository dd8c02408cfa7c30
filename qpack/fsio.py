"""The one atomic file write qpack uses for artifacts, checkpoints, shards, tokenizers, manifests and plots.

A file is written to a temp file in its target directory, fsynced, given the mode a plain open() would give it
(mkstemp makes 0600 files), renamed over the target and the directory fsynced: a reader sees the old file or the
whole new one, never half of either, and a failure leaves no temp file behind.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Iterable

from .errors import QpackFormatError, Reason

StepHook = Callable[[str], None] | None
STEPS = ("temp_created", "data_written", "fsynced", "replaced", "dir_fsynced")


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a crash (best effort where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # best effort: some filesystems refuse fsync on a directory; the rename itself is already atomic
    finally:
        os.close(fd)


def default_mode() -> int:
    """The permission bits open(path, "w") would give a new file under the current umask."""
    old = os.umask(0)
    os.umask(old)
    return 0o666 & ~old


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], None], _on_step: StepHook = None) -> int:
    """Run write(temp_path) beside `path`, then fsync, chmod, rename over `path`; returns the bytes written.

    On any exception the temp file is removed and an existing `path` is left untouched; OSError becomes
    QpackFormatError(Reason.IO). `_on_step(name)` is called at each of STEPS (a crash-test hook).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    step = _on_step or (lambda name: None)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise QpackFormatError(path, Reason.IO, f"cannot create a file in {directory}: {exc.strerror}") from None
    replaced = False
    try:
        step("temp_created")
        write(tmp)
        step("data_written")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
            written = os.fstat(fh.fileno()).st_size
        step("fsynced")
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
        replaced = True
        step("replaced")
        fsync_dir(directory)
        step("dir_fsynced")
        return written
    except OSError as exc:
        raise QpackFormatError(path, Reason.IO, f"cannot write: {exc.strerror or exc}; nothing was written") \
            from None
    finally:
        if not replaced:
            try:
                os.unlink(tmp)
            except OSError:
                pass  # the temp file is already gone; the error being raised is the one that matters


def atomic_write(path: str | os.PathLike, chunks: Iterable[bytes], _on_step: StepHook = None) -> int:
    """atomic_write_with for a stream of byte chunks; returns the bytes written."""

    def write(tmp: str) -> None:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)

    return atomic_write_with(path, write, _on_step)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, _on_step: StepHook = None) -> int:
    """atomic_write for one bytes object (an artifact built in memory)."""
    return atomic_write(path, [data], _on_step)

"""The exceptions qpack raises. Every error that reaches the CLI is a QpackError with a message for a person."""
from __future__ import annotations

import enum
import os


class QpackError(Exception):
    """Base of every error qpack reports; the CLI prints its message on one line and exits with code 2."""


class Reason(str, enum.Enum):
    """Why a file was refused; stable names so tests and tools can match on them."""

    IO = "io"
    TRUNCATED = "truncated"
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    BAD_HEADER = "bad_header"
    BAD_MANIFEST = "bad_manifest"
    CHECKSUM = "checksum"
    LIMIT = "limit"
    LAYOUT = "layout"
    UNKNOWN_CODEC = "unknown_codec"
    UNKNOWN_SCHEME = "unknown_scheme"
    CODEC = "codec"
    BOMB = "bomb"
    TRAILING = "trailing"
    UNSAFE = "unsafe"
    NOT_A_MODEL = "not_a_model"


class QpackFormatError(QpackError):
    """A file (artifact, checkpoint, shard, tokenizer) is malformed, corrupted, hostile or unsupported."""

    def __init__(self, path: str | os.PathLike | None, reason: Reason | str, detail: str):
        self.path = None if path is None else os.fspath(path)
        self.reason = Reason(reason)
        self.detail = detail
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{detail}")


class QpackInputError(QpackError):
    """A flag, option or argument given by the user makes no sense."""


class BudgetError(QpackError):
    """The budget cannot be met; carries the smallest reachable size in bytes."""

    def __init__(self, message: str, min_bytes: int | None = None):
        self.min_bytes = min_bytes
        super().__init__(message)


def read_error(path: str | os.PathLike, exc: OSError, kind: str) -> QpackFormatError:
    """The one-line error for a file that cannot be opened or read; `kind` names what was expected."""
    if isinstance(exc, FileNotFoundError):
        return QpackFormatError(path, Reason.IO, "no such file")
    if isinstance(exc, IsADirectoryError):
        return QpackFormatError(path, Reason.IO, f"is a directory, not {kind}")
    return QpackFormatError(path, Reason.IO, f"cannot read: {exc.strerror or exc}")

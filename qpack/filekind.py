"""What a file is, told by its first bytes (and its suffix where the bytes alone cannot tell): the one sniffer.

Kinds: "artifact" (a .qpk container), "torch" (a torch.save zip or a legacy/bare pickle), "safetensors", "unknown".
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import read_error

ARTIFACT_MAGIC = b"QPACK\x00\r\n"  # docs/FORMAT.md: the container header's first 8 bytes
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")  # a pickle opens with PROTO (0x80) and its version
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
HEAD_BYTES = 16


def read_head(path: str | os.PathLike, what: str = "a model file") -> bytes:
    """The first HEAD_BYTES bytes of `path`; a missing or unreadable file is QpackFormatError naming `what`."""
    try:
        with open(path, "rb") as fh:
            return fh.read(HEAD_BYTES)
    except OSError as exc:
        raise read_error(path, exc, what) from None


def kind_of(path: str | os.PathLike, head: bytes) -> str:
    """Decide by content and suffix together: a renamed file is still what its bytes say it is."""
    if head.startswith(ARTIFACT_MAGIC):
        return "artifact"
    suffix = Path(path).suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    if head[:4] == ZIP_MAGIC:
        return "torch"
    looks_safetensors = head[8:9] == b"{"  # u64 header length, then the JSON header
    if head[:1] == b"\x80" and head[1:2] in PICKLE_PROTOCOLS and not (
            looks_safetensors and suffix not in PICKLE_SUFFIXES):
        return "torch"
    if looks_safetensors:
        return "safetensors"
    if suffix in PICKLE_SUFFIXES and head[:1] in (b"(", b"}", b"]", b"c", b"\x80"):
        return "torch"
    return "unknown"


def sniff(path: str | os.PathLike, what: str = "a model file") -> str:
    """kind_of the file at `path`, reading only its head."""
    return kind_of(path, read_head(path, what))


def is_artifact(path: str | os.PathLike, what: str = "a model file") -> bool:
    """Whether `path` starts with the .qpk magic."""
    return read_head(path, what).startswith(ARTIFACT_MAGIC)

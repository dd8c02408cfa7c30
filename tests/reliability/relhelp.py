"""Shared helpers of the reliability suite: an independent .qpk framer, raw pickle opcodes, subprocess probes.

`seal()` frames a manifest and payload with correct CRCs and SHA-256 trailer, written from docs/FORMAT.md and
not from qpack.container, so hostile manifests reach the checks that sit behind the checksums.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ATTACKS = HERE / "attacks"
GOLDEN = HERE / "golden"
MAGIC = b"QPACK\x00\r\n"
PY = sys.executable


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def seal(manifest, payload: bytes, *, version: int = 1, flags: int = 0, mlen: int | None = None,
         manifest_crc: int | None = None, header_crc: int | None = None, trailer: bytes | None = None,
         deflate: bool = False) -> bytes:
    """Header + manifest + payload + SHA-256 trailer, every checksum right unless overridden.

    With deflate the manifest is stored as a zlib stream and header flag bit 0 is set (FORMAT.md)."""
    body = manifest if isinstance(manifest, bytes) else canonical(manifest)
    if deflate:
        body, flags = zlib.compress(body, 9), flags | 1
    head = MAGIC + struct.pack("<IIQI", version, flags, len(body) if mlen is None else mlen,
                               zlib.crc32(body) if manifest_crc is None else manifest_crc)
    head += struct.pack("<I", zlib.crc32(head) if header_crc is None else header_crc)
    out = head + body + payload
    return out + (hashlib.sha256(out).digest() if trailer is None else trailer)


def split(data: bytes) -> tuple[dict, bytes]:
    """(manifest, payload) of a well-formed container, read straight from the spec layout."""
    (flags, mlen) = struct.unpack_from("<IQ", data, 12)
    body = data[32: 32 + mlen]
    if flags & 1:  # FLAG_ZLIB_MANIFEST: the stored manifest is a zlib stream
        body = zlib.decompress(body)
    return json.loads(body), data[32 + mlen: -32]


def section_records(named: list[tuple[str, dict, bytes, int]]) -> tuple[list[dict], bytes]:
    """[(name, codec spec, encoded bytes, raw_length)] -> (manifest section records, payload)."""
    records, payload = [], b""
    for name, codec, data, raw_length in named:
        records.append({"name": name, "codec": codec, "offset": len(payload), "length": len(data),
                        "raw_length": raw_length, "crc32": zlib.crc32(data)})
        payload += data
    return records, payload


def raw_tensor_container(name: str, codec: dict, data: bytes, raw_length: int, dtype: str = "uint8") -> bytes:
    """A container holding one passthrough uint8 tensor of `raw_length` bytes whose section is `data`."""
    sec = f"{name}:data"
    records, payload = section_records([(sec, codec, data, raw_length)])
    manifest = {"format": "qpack", "version": 1, "meta": {"model_config": None}, "sections": records,
                "tensors": [{"name": name, "kind": "raw", "shape": [raw_length], "dtype": dtype,
                             "data": {"section": sec, "codec": codec}}]}
    return seal(manifest, payload)


# ------------------------------------------------------------------------------------------ pickle opcodes
PROTO2, PROTO4, STOP, REDUCE, MARK, TUPLE, TUPLE1, TUPLE2, EMPTY_TUPLE, LIST, SETITEM = (
    b"\x80\x02", b"\x80\x04", b".", b"R", b"(", b"t", b"\x85", b"\x86", b")", b"l", b"s")
MEMOIZE, STACK_GLOBAL, POP, OBJ = b"\x94", b"\x93", b"0", b"o"


def g(module: str, name: str) -> bytes:
    """GLOBAL module.name (protocol 0-3 text form)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def u(text: str) -> bytes:
    """BINUNICODE."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def su(text: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def binbytes(raw: bytes) -> bytes:
    """BINBYTES (protocol 3)."""
    return b"B" + struct.pack("<I", len(raw)) + raw


def binget(i: int) -> bytes:
    return b"h" + bytes([i])


# ------------------------------------------------------------------------------------------ subprocesses
def run_py(code: str, *args: str, cwd: str | os.PathLike | None = None, timeout: float = 120,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -c code args...` with the repository on sys.path; returns the completed process."""
    full_env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([PY, "-c", code, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def load_index(folder: Path) -> dict[str, dict]:
    return json.loads((folder / "index.json").read_text())


def record(part: str, **figures) -> None:
    """Append one JSON line of figures to $QPACK_RELIABILITY_LOG (how the long pass's README numbers are kept)."""
    log = os.environ.get("QPACK_RELIABILITY_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"part": part, **figures}, sort_keys=True) + "\n")

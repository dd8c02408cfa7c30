"""The .qpk container: a checked header, a canonical JSON manifest, codec-encoded sections and a SHA-256 trailer.

The byte layout is specified in docs/FORMAT.md. The reader trusts nothing: every size and offset is checked
against the file size and fixed limits before anything is allocated, every checksum is verified, and every
failure raises QpackFormatError naming the file and what is wrong. The writer is atomic and deterministic.
"""
from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

from .codecs import Codec, make_codec
from .filekind import ARTIFACT_MAGIC
from .errors import QpackError, QpackFormatError, Reason, read_error
from .jsonio import MAX_JSON_DEPTH, canonical_json, json_depth, parse_json  # noqa: F401  (the one JSON)
from .fsio import StepHook, atomic_write, atomic_write_bytes, fsync_dir  # noqa: F401  (the one atomic write)

MAGIC = ARTIFACT_MAGIC
VERSION = 1
HEADER_SIZE = 32
TRAILER_SIZE = 32
_HEADER = struct.Struct("<8sIIQII")  # magic, version, flags, manifest_len, manifest_crc, header_crc
FLAG_ZLIB_MANIFEST = 0x1  # the stored manifest is a zlib stream (RFC 1950) of the JSON
KNOWN_FLAGS = FLAG_ZLIB_MANIFEST

MAX_MANIFEST_BYTES = 16 * 2**20
MAX_SECTION_RAW = 4 * 2**30
MAX_TOTAL_RAW = 64 * 2**30
MAX_FILE_BYTES = 64 * 2**30
MAX_SECTIONS = 1_000_000
MAX_NAME_CHARS = 1024
_SECTION_KEYS = frozenset({"name", "codec", "offset", "length", "raw_length", "crc32"})
_MANIFEST_KEYS = frozenset({"format", "version", "meta", "sections", "tensors"})


@dataclass(frozen=True)
class Section:
    """One encoded section ready to write: its name, codec spec, encoded bytes and decoded length."""

    name: str
    codec: dict[str, Any]  # {"name": ..., "params": {...}} as Codec.spec() gives it
    data: bytes
    raw_length: int


@dataclass(frozen=True)
class SectionInfo:
    """A section as the manifest describes it (offset relative to the end of the manifest)."""

    name: str
    codec: dict[str, Any]
    offset: int
    length: int
    raw_length: int
    crc32: int


def encode_section(name: str, codec: Codec, raw: bytes, verify: bool = False) -> Section:
    """Encode `raw` with `codec`; with verify, decode it back and insist on the same bytes."""
    raw = bytes(raw)
    data = codec.encode(raw)
    if verify and codec.decode(data, len(raw)) != raw:
        raise QpackError(f"codec {codec.label()} did not round-trip section {name!r}")
    return Section(name, codec.spec(), data, len(raw))


# ----------------------------------------------------------------------------------------------- writing


def _manifest(meta: dict, tensors: list, sections: list[Section]) -> bytes:
    names = [s.name for s in sections]
    if len(set(names)) != len(names):
        raise QpackError("section names must be unique")
    records, offset = [], 0
    if sum(s.raw_length for s in sections) > MAX_TOTAL_RAW or any(s.raw_length > MAX_SECTION_RAW for s in sections):
        raise QpackError(f"sections exceed the format's limits ({MAX_SECTION_RAW} bytes each decoded, "
                         f"{MAX_TOTAL_RAW} in all); split the tensor")
    for s in sections:
        records.append(
            {
                "name": s.name,
                "codec": s.codec,
                "offset": offset,
                "length": len(s.data),
                "raw_length": s.raw_length,
                "crc32": zlib.crc32(s.data),
            }
        )
        offset += len(s.data)
    manifest = {"format": "qpack", "version": VERSION, "meta": meta, "sections": records, "tensors": tensors}
    body = canonical_json(manifest)
    if len(body) > MAX_MANIFEST_BYTES:
        raise QpackError(f"manifest is {len(body)} bytes; the format allows at most {MAX_MANIFEST_BYTES}")
    return body


def _stored_manifest(body: bytes, compress: bool) -> tuple[bytes, int]:
    """(stored manifest bytes, header flags). The JSON repeats keys and codec specs per tensor, so zlib
    shrinks it about 15x: tens of kilobytes that a byte budget would otherwise pay for."""
    if not compress:
        return body, 0
    z = zlib.compressobj(level=9, method=zlib.DEFLATED, wbits=15, memLevel=9, strategy=zlib.Z_DEFAULT_STRATEGY)
    stored = z.compress(body) + z.flush()
    if len(stored) > MAX_MANIFEST_BYTES:
        raise QpackError(f"compressed manifest is {len(stored)} bytes; the format allows at most {MAX_MANIFEST_BYTES}")
    return stored, FLAG_ZLIB_MANIFEST


def _header(stored: bytes, flags: int) -> bytes:
    head = _HEADER.pack(MAGIC, VERSION, flags, len(stored), zlib.crc32(stored), 0)[:28]
    return head + struct.pack("<I", zlib.crc32(head))


def container_size(meta: dict, tensors: list, sections: list[Section], compress_manifest: bool = True) -> int:
    """Exact size in bytes of the file build_container would produce, without assembling the payload."""
    stored, _ = _stored_manifest(_manifest(meta, tensors, sections), compress_manifest)
    return HEADER_SIZE + len(stored) + sum(len(s.data) for s in sections) + TRAILER_SIZE


def _chunks(meta: dict, tensors: list, sections: list[Section], compress_manifest: bool = True) -> Iterable[bytes]:
    stored, flags = _stored_manifest(_manifest(meta, tensors, sections), compress_manifest)
    sha = hashlib.sha256()
    for part in (_header(stored, flags), stored, *(s.data for s in sections)):
        sha.update(part)
        yield part
    yield sha.digest()


def build_container(meta: dict, tensors: list, sections: list[Section], compress_manifest: bool = True) -> bytes:
    """The complete container as bytes; the same arguments always give the same bytes."""
    return b"".join(_chunks(meta, tensors, sections, compress_manifest))


def write_container(
    path: str | os.PathLike, meta: dict, tensors: list, sections: list[Section], _on_step: StepHook = None,
    compress_manifest: bool = True,
) -> int:
    """Atomically write a container to `path`; returns the number of bytes written."""
    chunks = list(_chunks(meta, tensors, sections, compress_manifest))  # build (and validate) before touching disk
    return atomic_write(path, chunks, _on_step)


# ----------------------------------------------------------------------------------------------- reading

def is_int(value: Any) -> bool:
    """True for a real int (bool excluded: JSON true is not a size)."""
    return type(value) is int


def check_uint(path: str, value: Any, what: str, limit: int) -> int:
    """`value` must be an int in [0, limit]; anything else (bool, float, negative, huge) is refused."""
    if not is_int(value):
        raise QpackFormatError(path, Reason.BAD_MANIFEST, f"{what} must be an integer, got {value!r:.60}")
    if value < 0 or value > limit:
        raise QpackFormatError(path, Reason.LIMIT, f"{what} = {value} is outside 0..{limit}")
    return value


def check_name(path: str, value: Any, what: str) -> str:
    """A non-empty name string of sane length."""
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS or not value.isprintable():
        raise QpackFormatError(path, Reason.BAD_MANIFEST, f"{what} must be a printable string of 1 to "
                               f"{MAX_NAME_CHARS} characters, got {value!r:.60}")
    return value


def _check_codec_spec(path: str, spec: Any, where: str) -> Codec:
    if not isinstance(spec, dict) or set(spec) != {"name", "params"}:
        raise QpackFormatError(path, Reason.BAD_MANIFEST, f"{where}: codec must be {{\"name\", \"params\"}}")
    name, params = spec["name"], spec["params"]
    check_name(path, name, f"{where}: codec name")
    if not isinstance(params, dict):
        raise QpackFormatError(path, Reason.BAD_MANIFEST, f"{where}: codec params must be an object")
    from .codecs import codec_names

    if name not in codec_names():  # a registry lookup only: names from files are never imported
        raise QpackFormatError(
            path, Reason.UNKNOWN_CODEC,
            f"{where}: unknown codec {name!r} (known: {', '.join(codec_names())}); install the plugin that provides it",
        )
    try:
        return make_codec(name, params)
    except QpackError as exc:
        raise QpackFormatError(path, Reason.BAD_MANIFEST, f"{where}: bad codec parameters: {exc}") from None
    except Exception as exc:  # a plugin's validate() may raise anything on hostile params
        raise QpackFormatError(path, Reason.BAD_MANIFEST, f"{where}: bad codec parameters: {exc!r:.200}") from None


class Container:
    """A verified container held in memory; sections are decoded on demand, with their size capped."""

    def __init__(self, path: str, data: bytes, manifest_len: int, meta: dict, tensors: list,
                 sections: list[SectionInfo], codecs: dict[str, Codec]):
        self.path = path
        self.size = len(data)
        self.manifest_len = manifest_len
        self.meta = meta
        self.tensors = tensors
        self.sections = sections
        self._data = data
        self._codecs = codecs
        self._by_name = {s.name: s for s in sections}
        self._base = HEADER_SIZE + manifest_len

    def section_info(self, name: str) -> SectionInfo:
        """The manifest record of section `name`."""
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise QpackFormatError(self.path, Reason.BAD_MANIFEST, f"no section named {name!r:.80}") from None

    def encoded(self, name: str) -> bytes:
        """The encoded bytes of section `name` (its CRC was verified when the file was opened)."""
        info = self.section_info(name)
        start = self._base + info.offset
        return self._data[start : start + info.length]

    def section(self, name: str) -> bytes:
        """Section `name` decoded by its codec, exactly raw_length bytes (never more is produced)."""
        info = self.section_info(name)
        codec = self._codecs[name]
        # Only the codec contract's errors mean "corrupt data": CodecError (any QpackError) and running out of
        # memory on a hostile size. Anything else is a bug in a decoder and must surface as itself.
        try:
            out = codec.decode(self.encoded(name), info.raw_length)
        except QpackError as exc:
            raise QpackFormatError(self.path, Reason.CODEC, f"section {name!r}: {exc}") from None
        except MemoryError:
            raise QpackFormatError(self.path, Reason.CODEC, f"section {name!r}: {codec.name} decoder ran "
                                   f"out of memory on a {info.raw_length}-byte promise") from None
        if not isinstance(out, (bytes, bytearray, memoryview)) or len(out) != info.raw_length:
            got = len(out) if isinstance(out, (bytes, bytearray, memoryview)) else type(out).__name__
            raise QpackFormatError(
                self.path, Reason.BOMB if isinstance(got, int) and got > info.raw_length else Reason.CODEC,
                f"section {name!r} decoded to {got} bytes; the manifest promises {info.raw_length}",
            )
        return bytes(out)


def _parse_header(path: str, data: bytes) -> tuple[int, int]:
    size = len(data)
    if size < 8 or data[:8] != MAGIC:
        if MAGIC.startswith(data[:8]) and size < 8:
            raise QpackFormatError(path, Reason.TRUNCATED, f"file is {size} bytes: truncated before the header ends")
        raise QpackFormatError(path, Reason.BAD_MAGIC, "not a qpack artifact (wrong magic bytes)")
    if size < HEADER_SIZE:
        raise QpackFormatError(path, Reason.TRUNCATED, f"file is {size} bytes: truncated inside the header")
    _, version, flags, manifest_len, manifest_crc, header_crc = _HEADER.unpack_from(data)
    header_ok = zlib.crc32(data[:28]) == header_crc
    if version != VERSION:
        if header_ok:
            raise QpackFormatError(path, Reason.BAD_VERSION, f"format version {version} is not supported; this "
                                   f"qpack reads version {VERSION} (upgrade qpack to read newer files)")
        raise QpackFormatError(path, Reason.CHECKSUM, f"header is corrupted (version field reads {version}, "
                               "header CRC does not match)")
    if not header_ok:
        raise QpackFormatError(path, Reason.CHECKSUM, "header CRC-32 does not match: the header is corrupted")
    if flags & ~KNOWN_FLAGS:
        raise QpackFormatError(path, Reason.BAD_HEADER, f"unknown header flags 0x{flags & ~KNOWN_FLAGS:08x}; "
                               "written by a newer qpack?")
    if manifest_len > MAX_MANIFEST_BYTES:
        raise QpackFormatError(path, Reason.LIMIT, f"manifest length {manifest_len} exceeds {MAX_MANIFEST_BYTES}")
    if manifest_len < 2:
        raise QpackFormatError(path, Reason.BAD_HEADER, f"manifest length {manifest_len} is too small")
    if HEADER_SIZE + manifest_len + TRAILER_SIZE > size:
        raise QpackFormatError(path, Reason.TRUNCATED, f"file is {size} bytes but its manifest alone needs "
                               f"{HEADER_SIZE + manifest_len + TRAILER_SIZE}: truncated")
    if zlib.crc32(data[HEADER_SIZE : HEADER_SIZE + manifest_len]) != manifest_crc:
        raise QpackFormatError(path, Reason.CHECKSUM, "manifest CRC-32 does not match: the manifest is corrupted")
    return manifest_len, flags


def _inflate_manifest(path: str, stored: bytes) -> bytes:
    """Decompress a zlib manifest, never producing more than the 16 MiB the format allows."""
    z = zlib.decompressobj(wbits=15)
    try:
        body = z.decompress(stored, MAX_MANIFEST_BYTES + 1)
    except zlib.error as exc:
        raise QpackFormatError(path, Reason.BAD_MANIFEST, f"compressed manifest is corrupt: {exc}") from None
    if len(body) > MAX_MANIFEST_BYTES:
        raise QpackFormatError(path, Reason.LIMIT, f"manifest inflates past {MAX_MANIFEST_BYTES} bytes")
    if not z.eof or z.unused_data or z.unconsumed_tail:
        raise QpackFormatError(path, Reason.BAD_MANIFEST, "compressed manifest is incomplete or followed by junk")
    return body


def _parse_sections(path: str, records: Any) -> list[SectionInfo]:
    if not isinstance(records, list):
        raise QpackFormatError(path, Reason.BAD_MANIFEST, "manifest 'sections' must be a list")
    if len(records) > MAX_SECTIONS:
        raise QpackFormatError(path, Reason.LIMIT, f"{len(records)} sections; at most {MAX_SECTIONS}")
    out, seen, expect, total_raw = [], set(), 0, 0
    for i, rec in enumerate(records):
        where = f"section {i}"
        if not isinstance(rec, dict) or set(rec) != _SECTION_KEYS:
            raise QpackFormatError(path, Reason.BAD_MANIFEST, f"{where} must have exactly the keys "
                                   f"{sorted(_SECTION_KEYS)}")
        name = check_name(path, rec["name"], f"{where} name")
        where = f"section {name!r}"
        if name in seen:
            raise QpackFormatError(path, Reason.BAD_MANIFEST, f"duplicate section name {name!r}")
        seen.add(name)
        offset = check_uint(path, rec["offset"], f"{where} offset", MAX_FILE_BYTES)
        length = check_uint(path, rec["length"], f"{where} length", MAX_FILE_BYTES)
        raw_length = check_uint(path, rec["raw_length"], f"{where} raw_length", MAX_SECTION_RAW)
        crc = check_uint(path, rec["crc32"], f"{where} crc32", 2**32 - 1)
        if offset != expect:
            kind = "overlaps the previous one" if offset < expect else "leaves a gap"
            raise QpackFormatError(path, Reason.LAYOUT, f"{where} at offset {offset} {kind} (expected {expect})")
        expect += length
        total_raw += raw_length
        if total_raw > MAX_TOTAL_RAW:
            raise QpackFormatError(path, Reason.LIMIT, f"sections decode to more than {MAX_TOTAL_RAW} bytes in all")
        out.append(SectionInfo(name, rec["codec"], offset, length, raw_length, crc))
    return out


def parse_container(data: bytes, path: str | os.PathLike = "<bytes>") -> Container:
    """Verify a whole container held in memory and return it; any defect raises QpackFormatError."""
    path = os.fspath(path)
    size = len(data)
    if size > MAX_FILE_BYTES:
        raise QpackFormatError(path, Reason.LIMIT, f"file is {size} bytes; qpack reads at most {MAX_FILE_BYTES}")
    manifest_len, flags = _parse_header(path, data)
    body = data[HEADER_SIZE : HEADER_SIZE + manifest_len]
    if flags & FLAG_ZLIB_MANIFEST:
        body = _inflate_manifest(path, body)
    manifest = parse_json(path, body)
    if not isinstance(manifest, dict) or set(manifest) != _MANIFEST_KEYS:
        raise QpackFormatError(path, Reason.BAD_MANIFEST, f"manifest must be an object with exactly the keys "
                               f"{sorted(_MANIFEST_KEYS)}")
    if manifest["format"] != "qpack" or not is_int(manifest["version"]) or manifest["version"] != VERSION:
        raise QpackFormatError(path, Reason.BAD_VERSION, f"manifest declares format {manifest['format']!r:.40} "
                               f"version {manifest['version']!r:.40}; expected 'qpack' version {VERSION}")
    if not isinstance(manifest["meta"], dict):
        raise QpackFormatError(path, Reason.BAD_MANIFEST, "manifest 'meta' must be an object")
    tensors = manifest["tensors"]
    if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
        raise QpackFormatError(path, Reason.BAD_MANIFEST, "manifest 'tensors' must be a list of objects")
    sections = _parse_sections(path, manifest["sections"])
    codecs = {s.name: _check_codec_spec(path, s.codec, f"section {s.name!r}") for s in sections}
    payload = sum(s.length for s in sections)
    expected = HEADER_SIZE + manifest_len + payload + TRAILER_SIZE
    if size < expected:
        raise QpackFormatError(path, Reason.TRUNCATED, f"file is {size} bytes; its manifest describes {expected}: "
                               "truncated")
    if size > expected:
        raise QpackFormatError(path, Reason.TRAILING, f"{size - expected} unexpected bytes after the end of the "
                               f"artifact ({expected} bytes)")
    base = HEADER_SIZE + manifest_len
    view = memoryview(data)
    for s in sections:
        if zlib.crc32(view[base + s.offset : base + s.offset + s.length]) != s.crc32:
            raise QpackFormatError(path, Reason.CHECKSUM, f"section {s.name!r} CRC-32 does not match: corrupted")
    if hashlib.sha256(view[: size - TRAILER_SIZE]).digest() != bytes(view[size - TRAILER_SIZE :]):
        raise QpackFormatError(path, Reason.CHECKSUM, "SHA-256 trailer does not match the file: corrupted or "
                               "tampered with")
    return Container(path, data, manifest_len, manifest["meta"], tensors, sections, codecs)


def read_container(path: str | os.PathLike) -> Container:
    """Open, read and verify the container at `path`."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise QpackFormatError(path, Reason.LIMIT, f"file is {size} bytes; qpack reads at most "
                                       f"{MAX_FILE_BYTES}")
            data = fh.read(size + 1)  # one extra byte notices a file that grew while we read it
    except OSError as exc:
        raise read_error(path, exc, "an artifact") from None
    return parse_container(data, path)

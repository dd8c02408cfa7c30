"""The .qpk container: layout per docs/FORMAT.md, every refusal path, atomic and deterministic writes.

`seal()` below is an independent implementation of the framing (header, CRCs, SHA-256 trailer) written from the
spec, so tampered manifests can be given valid checksums and the checks behind the checksums get exercised.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import pytest

from qpack.codecs import CODECS, Codec, CodecError, codec_names, make_codec
from qpack.container import (
    MAGIC,
    MAX_MANIFEST_BYTES,
    Section,
    atomic_write,
    build_container,
    container_size,
    encode_section,
    parse_container,
    read_container,
    write_container,
)
from qpack.errors import QpackError, QpackFormatError, Reason

CODEC = "zstd" if "zstd" in codec_names() else "raw"


def sections(codec: str = CODEC) -> list[Section]:
    c = make_codec(codec, {})
    return [
        encode_section("alpha", c, bytes(range(256)) * 3, verify=True),
        encode_section("empty", make_codec("raw", {}), b""),
        encode_section("beta", make_codec("raw", {}), b"hello qpack"),
    ]


META = {"model_config": {"d": 8}, "note": "unicode \u00e9 stays ascii in the file"}
TENSORS = [{"name": "t", "anything": [1, 2, 3]}]


def manifest_text(data: bytes) -> bytes:
    """The manifest JSON of a container, read straight from the spec layout (inflated if flag bit 0 is set)."""
    flags, mlen = struct.unpack_from("<IQ", data, 12)
    stored = data[32 : 32 + mlen]
    return zlib.decompress(stored) if flags & 1 else stored


def split(data: bytes) -> tuple[dict, bytes]:
    """(manifest object, payload bytes) of a container."""
    (mlen,) = struct.unpack_from("<Q", data, 16)
    return json.loads(manifest_text(data)), data[32 + mlen : -32]


def seal(manifest: dict | bytes, payload: bytes, version: int = 1, flags: int = 0, mlen: int | None = None) -> bytes:
    """Frame a manifest and payload with correct header CRC, manifest CRC and SHA-256 trailer."""
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest, sort_keys=True,
                                                                   separators=(",", ":")).encode()
    head = MAGIC + struct.pack("<IIQI", version, flags, len(body) if mlen is None else mlen, zlib.crc32(body))
    head += struct.pack("<I", zlib.crc32(head))
    out = head + body + payload
    return out + hashlib.sha256(out).digest()


def good() -> bytes:
    return build_container(META, TENSORS, sections())


def refused(data: bytes, reason: Reason | None = None) -> QpackFormatError:
    with pytest.raises(QpackFormatError) as info:
        c = parse_container(data, "f.qpk")
        for s in c.sections:
            c.section(s.name)
    if reason is not None:
        assert info.value.reason == reason, str(info.value)
    assert str(info.value).startswith("f.qpk: ")
    return info.value


# ------------------------------------------------------------------------------------------------ layout


def test_round_trip_and_layout_matches_spec():
    data = good()
    c = parse_container(data, "f.qpk")
    assert c.meta == META and c.tensors == TENSORS
    assert [s.name for s in c.sections] == ["alpha", "empty", "beta"]
    assert c.section("alpha") == bytes(range(256)) * 3
    assert c.section("empty") == b""
    assert c.section("beta") == b"hello qpack"
    # framing per spec
    assert data[:8] == b"QPACK\x00\r\n"
    version, flags, mlen, mcrc, hcrc = struct.unpack_from("<IIQII", data, 8)
    assert (version, flags) == (1, 1)  # flag bit 0: the manifest is stored as a zlib stream
    assert hcrc == zlib.crc32(data[:28]) and mcrc == zlib.crc32(data[32 : 32 + mlen])
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()
    manifest, payload = split(data)
    assert manifest_text(data) == json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert len(data) == 32 + mlen + len(payload) + 32
    offset = 0
    for rec in manifest["sections"]:
        assert rec["offset"] == offset
        assert rec["crc32"] == zlib.crc32(payload[offset : offset + rec["length"]])
        offset += rec["length"]
    assert offset == len(payload)
    assert container_size(META, TENSORS, sections()) == len(data)


def test_deterministic_bytes():
    assert good() == good()
    # key order of the caller's dicts does not matter: the manifest is canonical
    meta2 = dict(reversed(list(META.items())))
    assert build_container(meta2, TENSORS, sections()) == good()


def test_uncompressed_manifest_variant():
    plain = build_container(META, TENSORS, sections(), compress_manifest=False)
    assert struct.unpack_from("<I", plain, 12)[0] == 0
    assert manifest_text(plain) == manifest_text(good())
    c = parse_container(plain)
    assert c.meta == META and c.section("beta") == b"hello qpack"
    assert container_size(META, TENSORS, sections(), compress_manifest=False) == len(plain)


def test_compressed_manifest_limits():
    manifest, payload = split(good())
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    bomb = json.dumps({"pad": " " * (MAX_MANIFEST_BYTES + 10)}).encode()
    for stored, reason in [
        (zlib.compress(bomb, 9), Reason.LIMIT),  # a small stream that inflates past 16 MiB
        (zlib.compress(text) + b"junk", Reason.BAD_MANIFEST),
        (zlib.compress(text)[:-5], Reason.BAD_MANIFEST),
        (b"\x78\x9c not deflate", Reason.BAD_MANIFEST),
        (text, Reason.BAD_MANIFEST),  # flag says compressed, bytes are plain JSON
    ]:
        refused(seal(stored, payload, flags=1), reason)
    assert parse_container(seal(zlib.compress(text), payload, flags=1)).meta == META


def test_manifest_is_ascii_json():
    manifest_bytes = manifest_text(good())
    manifest_bytes.decode("ascii")
    assert b" " not in manifest_bytes.replace(b"unicode \\u00e9 stays ascii in the file", b"")


def test_writer_refuses_bad_input():
    with pytest.raises(QpackError):
        build_container(META, TENSORS, sections() + sections()[:1])  # duplicate name
    with pytest.raises(QpackError):
        build_container({"x": float("nan")}, TENSORS, sections())
    with pytest.raises(QpackError):
        build_container({"x": object()}, TENSORS, sections())


# ------------------------------------------------------------------------------------------------ header


def test_wrong_magic():
    refused(b"PK\x03\x04" + good()[4:], Reason.BAD_MAGIC)
    refused(b"", Reason.TRUNCATED)
    refused(b"QPA", Reason.TRUNCATED)
    refused(b"\x89PNG\r\n\x1a\n" + b"\0" * 100, Reason.BAD_MAGIC)


def test_unsupported_version_is_named():
    manifest, payload = split(good())
    err = refused(seal(manifest, payload, version=2), Reason.BAD_VERSION)
    assert "version 2" in str(err)
    # a corrupted version field (header CRC wrong) is called corruption, not a newer version
    data = bytearray(good())
    data[8] ^= 0x04
    refused(bytes(data), Reason.CHECKSUM)


def test_unknown_flags_refused():
    manifest, payload = split(good())
    refused(seal(manifest, payload, flags=2), Reason.BAD_HEADER)
    refused(seal(manifest, payload, flags=1 << 31), Reason.BAD_HEADER)


def test_manifest_length_limits():
    manifest, payload = split(good())
    refused(seal(manifest, payload, mlen=MAX_MANIFEST_BYTES + 1), Reason.LIMIT)
    refused(seal(manifest, payload, mlen=2**63), Reason.LIMIT)
    refused(seal(manifest, payload, mlen=10**6), Reason.TRUNCATED)


def test_manifest_crc_and_header_crc():
    data = bytearray(good())
    data[40] ^= 0x20  # inside the manifest
    refused(bytes(data), Reason.CHECKSUM)
    data = bytearray(good())
    data[28] ^= 0x01  # the header CRC itself
    refused(bytes(data), Reason.CHECKSUM)


# ------------------------------------------------------------------------------------------------ manifest


def mutate(edit) -> bytes:
    manifest, payload = split(good())
    edit(manifest)
    return seal(manifest, payload)


def test_resealed_untouched_file_is_accepted():
    assert parse_container(mutate(lambda m: None)).meta == META


@pytest.mark.parametrize(
    "field,value,reason",
    [
        ("offset", -1, Reason.LIMIT),
        ("length", -5, Reason.LIMIT),
        ("raw_length", -1, Reason.LIMIT),
        ("raw_length", 4 * 2**30 + 1, Reason.LIMIT),
        ("length", True, Reason.BAD_MANIFEST),
        ("raw_length", 10.0, Reason.BAD_MANIFEST),
        ("raw_length", "10", Reason.BAD_MANIFEST),
        ("raw_length", None, Reason.BAD_MANIFEST),
        ("crc32", 2**32, Reason.LIMIT),
        ("offset", 2**70, Reason.LIMIT),
        ("name", "", Reason.BAD_MANIFEST),
        ("name", 7, Reason.BAD_MANIFEST),
        ("name", "a\nb", Reason.BAD_MANIFEST),
        ("codec", {"name": "zstd"}, Reason.BAD_MANIFEST),
        ("codec", {"name": "no_such_codec", "params": {}}, Reason.UNKNOWN_CODEC),
        ("codec", {"name": "os.system", "params": {}}, Reason.UNKNOWN_CODEC),
        ("codec", {"name": "raw", "params": {"evil": 1}}, Reason.BAD_MANIFEST),
        ("codec", {"name": "raw", "params": []}, Reason.BAD_MANIFEST),
    ],
)
def test_bad_section_fields(field, value, reason):
    def edit(m):
        m["sections"][0][field] = value

    refused(mutate(edit), reason)


def test_gap_overlap_duplicate_missing_and_extra_keys():
    def gap(m):
        m["sections"][1]["offset"] += 1

    def overlap(m):
        m["sections"][2]["offset"] -= 1

    def dup(m):
        m["sections"][2]["name"] = "alpha"

    def missing(m):
        del m["sections"][0]["crc32"]

    def extra(m):
        m["sections"][0]["padding"] = 0

    refused(mutate(gap), Reason.LAYOUT)
    refused(mutate(overlap), Reason.LAYOUT)
    refused(mutate(dup), Reason.BAD_MANIFEST)
    refused(mutate(missing), Reason.BAD_MANIFEST)
    refused(mutate(extra), Reason.BAD_MANIFEST)


def test_lengths_must_tile_the_file_exactly():
    def longer(m):
        m["sections"][2]["length"] += 1

    def shorter(m):
        m["sections"][2]["length"] -= 1

    refused(mutate(longer), Reason.TRUNCATED)
    refused(mutate(shorter), Reason.TRAILING)


def test_total_raw_length_limit():
    def huge(m):
        rec = m["sections"][0]
        m["sections"] = [dict(rec, name=f"s{i}", offset=0 if i == 0 else rec["length"], length=rec["length"] if i == 0
                              else 0, raw_length=4 * 2**30) for i in range(17)]

    refused(mutate(huge), Reason.LIMIT)


def test_section_crc_checked():
    manifest, payload = split(good())
    manifest["sections"][0]["crc32"] ^= 1
    refused(seal(manifest, payload), Reason.CHECKSUM)
    flipped = bytearray(payload)
    flipped[3] ^= 0x10
    manifest, _ = split(good())
    refused(seal(manifest, bytes(flipped)), Reason.CHECKSUM)


def test_tampered_manifest_with_recomputed_crcs_but_old_trailer():
    manifest, payload = split(good())
    manifest["meta"]["note"] = "tampered"
    forged = seal(manifest, payload)
    forged = forged[:-32] + good()[-32:]
    refused(forged, Reason.CHECKSUM)


@pytest.mark.parametrize(
    "body,reason",
    [
        (b"[]", Reason.BAD_MANIFEST),
        (b"{}", Reason.BAD_MANIFEST),
        (b"\xff\xfe{}", Reason.BAD_MANIFEST),
        (b'{"a":1,"a":2}', Reason.BAD_MANIFEST),
        (b'{"x":NaN}', Reason.BAD_MANIFEST),
        (b'{"x":Infinity}', Reason.BAD_MANIFEST),
        (b'{"x":1e999}', Reason.BAD_MANIFEST),
        (b'{"x":' + b"9" * 5000 + b"}", Reason.BAD_MANIFEST),
        (b"[" * 33 + b"]" * 33, Reason.LIMIT),
        (b"[" * 100000 + b"]" * 100000, Reason.LIMIT),
        (b"{" * 5, Reason.BAD_MANIFEST),
    ],
)
def test_hostile_manifest_json(body, reason):
    refused(seal(body, b""), reason)


def test_depth_limit_is_32():
    def nest(depth):  # meta holds a list nested so that the manifest's depth is exactly `depth`
        manifest, payload = split(good())
        value = []
        for _ in range(depth - 3):  # manifest object (1) + meta object (2) + the outermost list
            value = [value]
        manifest["meta"] = {"deep": value}
        return seal(manifest, payload)

    assert parse_container(nest(32)).meta["deep"]
    refused(nest(33), Reason.LIMIT)


def test_manifest_keys_and_types():
    for edit, reason in [
        (lambda m: m.pop("tensors"), Reason.BAD_MANIFEST),
        (lambda m: m.update(extra=1), Reason.BAD_MANIFEST),
        (lambda m: m.update(format="zip"), Reason.BAD_VERSION),
        (lambda m: m.update(version=2), Reason.BAD_VERSION),
        (lambda m: m.update(version=True), Reason.BAD_VERSION),
        (lambda m: m.update(meta=[]), Reason.BAD_MANIFEST),
        (lambda m: m.update(tensors={}), Reason.BAD_MANIFEST),
        (lambda m: m.update(tensors=[1]), Reason.BAD_MANIFEST),
        (lambda m: m.update(sections={}), Reason.BAD_MANIFEST),
    ]:
        refused(mutate(edit), reason)


def test_trailing_junk_and_truncation():
    data = good()
    refused(data + b"\0", Reason.TRAILING)
    refused(data + data, Reason.TRAILING)
    refused(data[:-1], Reason.TRUNCATED)
    refused(data[:40], Reason.TRUNCATED)


# ------------------------------------------------------------------------------------------------ bombs


class Expander(Codec):
    """A hostile codec: decodes to more bytes than it was asked for."""

    name = "test_expander"

    def encode(self, data: bytes) -> bytes:
        return bytes(data)

    def decode(self, data: bytes, size: int) -> bytes:
        return bytes(data) * 2


class Refuser(Codec):
    """A well-behaved codec on a corrupt frame: raises the contract's CodecError."""

    name = "test_refuser"

    def encode(self, data: bytes) -> bytes:
        return bytes(data)

    def decode(self, data: bytes, size: int) -> bytes:
        raise CodecError("test_refuser: corrupt frame")


class Buggy(Codec):
    """A decoder with a bug: its error is not the contract's and must not be dressed up as a corrupt file."""

    name = "test_buggy"

    def encode(self, data: bytes) -> bytes:
        return bytes(data)

    def decode(self, data: bytes, size: int) -> bytes:
        return bytes(len(data) // 0)


def test_decoder_output_is_capped_by_raw_length(monkeypatch):
    monkeypatch.setitem(CODECS._items, "test_expander", Expander)
    monkeypatch.setitem(CODECS._items, "test_refuser", Refuser)
    for cls, reason in ((Expander, Reason.BOMB), (Refuser, Reason.CODEC)):
        data = build_container({}, [], [encode_section("s", cls(), b"abcdef")])
        c = parse_container(data, "f.qpk")
        with pytest.raises(QpackFormatError) as info:
            c.section("s")
        assert info.value.reason == reason


def test_an_internal_decoder_bug_surfaces_as_itself(monkeypatch):
    monkeypatch.setitem(CODECS._items, "test_buggy", Buggy)
    c = parse_container(build_container({}, [], [encode_section("s", Buggy(), b"abcdef")]), "f.qpk")
    with pytest.raises(ZeroDivisionError):
        c.section("s")


@pytest.mark.skipif("zstd" not in codec_names(), reason="zstd codec not registered")
def test_zstd_frame_larger_than_raw_length_is_refused():
    big = encode_section("s", make_codec("zstd", {}), b"\0" * 2**20)
    lie = Section("s", big.codec, big.data, 1000)  # the manifest claims 1000 bytes; the frame holds 1 MiB
    c = parse_container(build_container({}, [], [lie]), "f.qpk")
    with pytest.raises(QpackFormatError) as info:
        c.section("s")
    assert info.value.reason in (Reason.CODEC, Reason.BOMB)


def test_every_byte_flip_and_truncation_is_refused():
    data = build_container({"m": 1}, [{"name": "x"}], [encode_section("a", make_codec(CODEC, {}), b"xyz" * 50),
                                                        encode_section("b", make_codec("raw", {}), b"q" * 20)])
    for i in range(len(data)):
        for mask in (0x01, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            refused(bytes(bad))
    for n in range(len(data)):
        refused(data[:n])


# ------------------------------------------------------------------------------------------------ files


def test_write_and_read_file(tmp_path):
    path = tmp_path / "m.qpk"
    n = write_container(path, META, TENSORS, sections())
    assert n == path.stat().st_size == len(good())
    assert path.read_bytes() == good()
    assert read_container(path).section("beta") == b"hello qpack"
    assert os.listdir(tmp_path) == ["m.qpk"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(QpackFormatError) as info:
        read_container(tmp_path / "missing.qpk")
    assert info.value.reason == Reason.IO and "missing.qpk" in str(info.value)
    with pytest.raises(QpackFormatError) as info:
        read_container(tmp_path)
    assert info.value.reason == Reason.IO


@pytest.mark.parametrize("step", ["temp_created", "data_written", "fsynced"])
def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path, step):
    path = tmp_path / "m.qpk"
    path.write_bytes(b"old artifact")

    def boom(name):
        if name == step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_container(path, META, TENSORS, sections(), _on_step=boom)
    assert path.read_bytes() == b"old artifact"
    assert os.listdir(tmp_path) == ["m.qpk"]


def test_steps_are_reported_in_order(tmp_path):
    seen = []
    write_container(tmp_path / "m.qpk", META, TENSORS, sections(), _on_step=seen.append)
    assert seen == ["temp_created", "data_written", "fsynced", "replaced", "dir_fsynced"]


def test_failing_chunk_source_leaves_nothing(tmp_path):
    def chunks():
        yield b"partial"
        raise ValueError("producer failed")

    with pytest.raises(ValueError):
        atomic_write(tmp_path / "m.qpk", chunks())
    assert os.listdir(tmp_path) == []


def test_unwritable_directory_is_a_format_error(tmp_path):
    with pytest.raises(QpackFormatError) as info:
        write_container(tmp_path / "no" / "such" / "m.qpk", META, TENSORS, sections())
    assert info.value.reason == Reason.IO

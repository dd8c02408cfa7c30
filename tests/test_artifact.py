"""Artifacts: exact round trips of codes, scales and passthrough tensors; validation of entries; corruption."""
from __future__ import annotations

import hashlib
import json
import struct
import zlib

import numpy as np
import pytest
import torch

import qpack
from qpack.artifact import (
    DTYPES,
    EncodedEntry,
    TensorEntry,
    build_artifact,
    encode_entry,
    loads_artifact,
    read_artifact,
    scales_from_bytes,
    scales_to_bytes,
    write_artifact,
)
from qpack.codecs import codec_names, make_codec
from qpack.errors import QpackError, QpackFormatError, QpackInputError, Reason
from qpack.quant import Quantized, make_quantizer

CODEC = "zstd" if "zstd" in codec_names() else "raw"


def seal(manifest: dict, payload: bytes) -> bytes:
    """Frame a manifest and payload with valid CRCs and trailer (independent of qpack.container)."""
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    head = b"QPACK\x00\r\n" + struct.pack("<IIQI", 1, 0, len(body), zlib.crc32(body))
    out = head + struct.pack("<I", zlib.crc32(head)) + body + payload
    return out + hashlib.sha256(out).digest()


def split(data: bytes) -> tuple[dict, bytes]:
    """(manifest object, payload) of a container; flag bit 0 means the manifest is a zlib stream."""
    flags, mlen = struct.unpack_from("<IQ", data, 12)
    stored = data[32 : 32 + mlen]
    return json.loads(zlib.decompress(stored) if flags & 1 else stored), data[32 + mlen : -32]


def quant(shape, bits, group_size=None, seed=0, scheme="rtn") -> Quantized:
    g = torch.Generator().manual_seed(seed)
    return make_quantizer(scheme, bits, group_size).quantize(torch.randn(*shape, generator=g))


def passthrough() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, generator=g)
    return {
        "bf16": x.to(torch.bfloat16),
        "fp16": x.to(torch.float16),
        "fp32": x,
        "fp64": x.double(),
        "i64": torch.tensor([-(2**62), -1, 0, 7, 2**62 + 5]),
        "i32": torch.tensor([[-(2**31), 2**31 - 1]], dtype=torch.int32),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
    }


def entries(codec: str = CODEC) -> list[TensorEntry]:
    c = make_codec(codec, {})
    out = [
        TensorEntry("blocks.0.attn.w", quant((16, 40), 6), codec=c, scale_codec=c),
        TensorEntry("blocks.0.mlp.w", quant((8, 33), 4, group_size=16, seed=2), layout="packed", codec=c),
        TensorEntry("conv", quant((4, 3, 5), 5, seed=3), layout="packed", dtype="bfloat16"),
        TensorEntry("vec", quant((17,), 8, seed=4), scale_layout="shuffled"),
        TensorEntry("ternary", quant((6, 10), 2, seed=5), layout="trit", codec=c),
        TensorEntry("lqer", quant((12, 20), 3, seed=6), codec=c,
                    lowrank=(quant((12, 2), 4, seed=7), quant((2, 20), 4, seed=8))),
    ]
    out += [TensorEntry(n, t, codec=c) for n, t in passthrough().items()]
    return out


def expected(e: TensorEntry) -> torch.Tensor:
    if isinstance(e.payload, torch.Tensor):
        return e.payload
    w = e.payload.dequantize()
    if e.lowrank:
        a, b = e.lowrank
        w = w + (a.dequantize() @ b.dequantize()).reshape(w.shape)
    return w


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: dtype, shape and every bit (NaN and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


# ------------------------------------------------------------------------------------------------ round trips


def test_round_trip_exact(tmp_path):
    es = entries()
    path = tmp_path / "m.qpk"
    n = write_artifact(path, es, {"model_config": {"arch": "gpt", "n_layer": 2}})
    assert n == path.stat().st_size
    art = read_artifact(path)
    assert art.names() == [e.name for e in es]
    assert art.model_config == {"arch": "gpt", "n_layer": 2}
    for e in es:
        got = art.quantized(e.name)
        if isinstance(e.payload, Quantized):
            p = e.payload
            assert isinstance(got, Quantized)
            assert np.array_equal(got.q, p.q) and got.q.dtype == torch.int8
            assert got.scales.dtype == torch.float16 and got.scales.numpy().tobytes() == p.scales.numpy().tobytes()
            assert (got.shape, got.bits, got.scheme, got.group_size, got.params) == \
                   (tuple(p.shape), p.bits, p.scheme, p.group_size, p.params)
            assert torch.equal(got.dequantize(), p.dequantize())
            lr = art.lowrank(e.name)
            if e.lowrank:
                for mine, theirs in zip(lr, e.lowrank):
                    assert np.array_equal(mine.q, theirs.q) and mine.scales.numpy().tobytes() == theirs.scales.numpy().tobytes()
            else:
                assert lr is None
        else:
            assert same_tensor(got, e.payload), e.name
    loaded = qpack.load(path)
    assert list(loaded) == [e.name for e in es]
    for e in es:
        assert same_tensor(loaded[e.name], expected(e)), e.name


@pytest.mark.parametrize("codec", codec_names())
def test_every_codec_round_trips(codec):
    es = [TensorEntry("w", quant((9, 31), 5, group_size=8), codec=make_codec(codec, {}),
                      scale_codec=make_codec(codec, {})),
          TensorEntry("b", torch.randn(31, generator=torch.Generator().manual_seed(3)), codec=make_codec(codec, {}))]
    art = loads_artifact(build_artifact(es))
    for e in es:
        assert same_tensor(art.tensor(e.name), expected(e))
        # a row coder is given the codes' row width (31 columns) by the writer, and the manifest says so
        want = make_codec(codec, {"width": 31} if codec == "ans_cols" and e.name == "w" else {}).spec()
        assert art.entry(e.name)[("codes" if e.name == "w" else "data")]["codec"] == want


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("layout", ["byte", "packed"])
def test_every_width_and_layout(bits, layout):
    q = quant((3, 13), bits, seed=bits)
    art = loads_artifact(build_artifact([TensorEntry("w", q, layout=layout)]))
    got = art.quantized("w")
    assert np.array_equal(got.q, q.q) and got.scales.numpy().tobytes() == q.scales.numpy().tobytes()


@pytest.mark.parametrize("bits", range(9, 13))
def test_wide_codes_round_trip_in_planes(bits):
    # codes past int8 (scheme uniform at fine steps) are stored as two byte planes whatever layout was asked for
    m = (1 << (bits - 1)) - 1
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(-m, m + 1, (5, 17), generator=g, dtype=torch.int16)
    codes[0, :2] = torch.tensor([m, -m], dtype=torch.int16)
    q = Quantized(codes, torch.full((5, 1), 0.001, dtype=torch.float16), (5, 17), bits, "uniform")
    for layout in ("byte", "auto", ("byte", "packed")):
        art = loads_artifact(build_artifact([TensorEntry("w", q, layout=layout, codec=make_codec("ans", {}))]))
        assert art.entry("w")["layout"] == "planes" and art.entry("w")["bits"] == bits
        got = art.quantized("w")
        assert got.q.dtype == torch.int16 and torch.equal(got.q, codes)


def _entropy_bytes(sym: np.ndarray) -> float:
    _, counts = np.unique(sym, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum() / 8)


def test_wide_codes_cost_about_their_entropy_under_ans():
    # Gaussian codes of std 100 (9-10 bits; the default menu's finest step, 0.015 std, gives 67 on a Gaussian
    # matrix): ans with one table per plane lands within 1% of the codes' own order-0 entropy (zigzag keeps most
    # codes at high byte 0) and well under one table over both planes
    g = torch.Generator().manual_seed(1)
    codes = (torch.randn(256, 1024, generator=g) * 100).round().clamp(-511, 511).to(torch.int16)
    q = Quantized(codes, torch.full((256, 1), 1e-3, dtype=torch.float16), (256, 1024), 10, "uniform")
    art = loads_artifact(build_artifact([TensorEntry("w", q, layout="auto", codec=make_codec("ans", {}))]))
    got = art.section_bytes("w")["codes"]
    h = _entropy_bytes(codes.numpy().reshape(-1))
    assert h < got < 1.01 * h
    one_table = len(make_codec("ans", {}).encode(art.container.section(art.entry("w")["codes"]["section"])))
    assert got < 0.97 * one_table


def test_wide_codes_out_of_range_are_refused():
    q = Quantized(torch.zeros(1, 4, dtype=torch.int16), torch.ones(1, 1, dtype=torch.float16), (1, 4), 9, "uniform")
    data = build_artifact([TensorEntry("w", q)])
    manifest, payload = split(data)
    codes = bytearray(payload[: manifest["sections"][0]["length"]])
    codes[0] = 2  # high byte 2: zigzag symbol 512 > 2 * qmax(9) = 510
    refused(_patch_section(data, 0, bytes(codes)), Reason.LAYOUT)


def test_deterministic_bytes(tmp_path):
    a = build_artifact(entries(), {"model_config": {"d": 1}})
    b = build_artifact(entries(), {"model_config": {"d": 1}})
    assert a == b
    write_artifact(tmp_path / "a.qpk", entries(), {"model_config": {"d": 1}})
    write_artifact(tmp_path / "b.qpk", entries(), {"model_config": {"d": 1}})
    assert (tmp_path / "a.qpk").read_bytes() == (tmp_path / "b.qpk").read_bytes() == a


def test_meta_records_versions():
    meta = loads_artifact(build_artifact(entries()[:1])).meta
    assert meta["qpack_version"] == qpack.__version__
    assert meta["model_config"] is None
    assert set(meta["libraries"]) >= {"zstandard", "brotli", "constriction", "liblzma"}
    import zstandard

    assert meta["libraries"]["zstandard"] == zstandard.__version__


def test_encode_entry_measures_exact_bytes():
    es = entries()
    encoded = [encode_entry(e) for e in es]
    assert all(isinstance(e, EncodedEntry) for e in encoded)
    blob = build_artifact(encoded, {"model_config": None})
    assert blob == build_artifact(es, {"model_config": None})  # encoded or not: the same bytes
    art = loads_artifact(blob)
    for e in encoded:  # nbytes is exactly what the entry's sections take in the file
        assert e.nbytes == sum(art.section_bytes(e.name).values())
    got = encode_entry(TensorEntry("w", quant((4, 8), 4), codec=make_codec(CODEC, {})))
    assert [s.name for s in got.sections] == ["w:codes", "w:scales"]
    assert got.manifest["codes"]["section"] == "w:codes" and got.manifest["kind"] == "quant"


def test_codec_choice_keeps_the_smallest_per_section():
    q = quant((64, 96), 4, seed=5)
    raw, zstd, ans = make_codec("raw", {}), make_codec("zstd", {}), make_codec("ans", {})
    alone = {c.name: encode_entry(TensorEntry("w", q, codec=c, scale_codec=raw, scale_layout="plain"))
             for c in (raw, zstd, ans)}
    best = encode_entry(TensorEntry("w", q, codec=[raw, zstd, ans], scale_codec=raw, scale_layout="plain"))
    sizes = {k: len(v.sections[0].data) for k, v in alone.items()}
    assert len(best.sections[0].data) == min(sizes.values())
    assert best.manifest["codes"]["codec"]["name"] == min(sizes, key=sizes.get)
    assert torch.equal(loads_artifact(build_artifact([best])).quantized("w").q, q.q)
    with pytest.raises(QpackInputError):
        encode_entry(TensorEntry("w", q, codec=[]))


def test_scale_layouts():
    s = (np.arange(40, dtype=np.float32).reshape(8, 5) / 7 + 1e-3).astype(np.float16)
    plain = scales_to_bytes(s, "plain")
    shuf = scales_to_bytes(s, "shuffled")
    assert plain == s.astype("<f2").tobytes()
    u16 = s.astype("<f2").view("<u2").reshape(-1)
    assert shuf == bytes(int(x) >> 8 for x in u16) + bytes(int(x) & 0xFF for x in u16)
    for lay, data in (("plain", plain), ("shuffled", shuf)):
        assert scales_from_bytes(data, lay, (8, 5)).tobytes() == s.tobytes()


@pytest.mark.skipif(CODEC == "raw", reason="needs a compressing codec")
def test_auto_scale_layout_keeps_the_smaller():
    c = make_codec(CODEC, {})
    q = quant((64, 32), 6)
    got = encode_entry(TensorEntry("w", q, codec=c, scale_codec=c))
    m, secs = got.manifest, got.sections
    chosen = m["scales"]["layout"]
    sizes = {lay: len(encode_entry(TensorEntry("w", q, codec=c, scale_codec=c, scale_layout=lay)).sections[1].data)
             for lay in ("plain", "shuffled")}
    assert len(secs[1].data) == min(sizes.values()) == sizes[chosen]


def test_writer_refuses_bad_entries():
    q = quant((4, 8), 4)
    with pytest.raises(QpackInputError):
        build_artifact([TensorEntry("w", q), TensorEntry("w", q)])
    with pytest.raises(QpackInputError):
        build_artifact([TensorEntry("", q)])
    with pytest.raises(QpackInputError):
        build_artifact([TensorEntry("w", q, layout="zigzag")])
    with pytest.raises(QpackError):
        build_artifact([TensorEntry("w", q, layout="trit")])  # trit holds 2-bit codes only
    with pytest.raises(QpackInputError):
        build_artifact([TensorEntry("c", torch.zeros(2, dtype=torch.complex64))])
    with pytest.raises(QpackInputError):
        build_artifact([TensorEntry("w", q, dtype="int8")])
    bad = quant((4, 8), 4)
    bad.scales[0, 0] = np.inf
    with pytest.raises(QpackInputError):
        build_artifact([TensorEntry("w", bad)])
    with pytest.raises(QpackInputError):
        build_artifact([TensorEntry("w", q, lowrank=(quant((4, 2), 4), quant((3, 8), 4)))])
    with pytest.raises(QpackInputError):
        build_artifact([TensorEntry("w", q)], {"model_config": "not a dict"})


# ------------------------------------------------------------------------------------------------ corruption


def small() -> tuple[bytes, dict[str, torch.Tensor]]:
    c = make_codec(CODEC, {})
    es = [TensorEntry("w", quant((24, 64), 4, group_size=16), codec=c, scale_codec=c),
          TensorEntry("n", torch.linspace(-1, 1, 64).to(torch.bfloat16), codec=c)]
    return build_artifact(es), {e.name: expected(e) for e in es}


def test_every_flipped_byte_and_every_truncation_is_refused():
    data, want = small()
    assert 1000 < len(data) < 4000
    art = loads_artifact(data)
    assert all(same_tensor(art.tensor(n), t) for n, t in want.items())

    def check(bad: bytes) -> None:
        try:
            got = loads_artifact(bad, "m.qpk").tensors()
        except QpackFormatError as exc:
            assert str(exc).startswith("m.qpk: ")
            return
        # never reached for a checksummed file; if it were, the tensors would have to be the right ones
        assert all(same_tensor(got[n], t) for n, t in want.items()) and False, "corruption went unnoticed"

    for i in range(len(data)):
        for mask in (0x01, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            check(bytes(bad))
    for n in range(len(data)):
        check(data[:n])
    check(data + b"\0")


def test_resealed_manifest_mutations_never_crash():
    """Flip each manifest byte and give the file valid checksums: only QpackFormatError may escape."""
    manifest, payload = split(small()[0])
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(len(body)):
        bad = bytearray(body)
        bad[i] ^= 0x01
        head = b"QPACK\x00\r\n" + struct.pack("<IIQI", 1, 0, len(bad), zlib.crc32(bad))
        out = head + struct.pack("<I", zlib.crc32(head)) + bytes(bad) + payload
        try:
            loads_artifact(out + hashlib.sha256(out).digest()).tensors()
            outcomes["loaded"] += 1  # e.g. a changed letter in a tensor name or a meta string
        except QpackFormatError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > outcomes["loaded"] > 0


def tamper(edit, data: bytes | None = None) -> bytes:
    manifest, payload = split(data or small()[0])
    edit(manifest)
    return seal(manifest, payload)


def refused(data: bytes, reason: Reason) -> None:
    with pytest.raises(QpackFormatError) as info:
        loads_artifact(data, "m.qpk").tensors()
    assert info.value.reason == reason, str(info.value)


def test_resealed_untouched_is_accepted():
    data, want = small()
    got = loads_artifact(tamper(lambda m: None)).tensors()
    assert all(same_tensor(got[n], t) for n, t in want.items())


def _w(m):
    return m["tensors"][0]


@pytest.mark.parametrize(
    "edit,reason",
    [
        (lambda m: _w(m).update(shape=[8, 25]), Reason.LAYOUT),
        (lambda m: _w(m).update(shape=[16, 12]), Reason.LAYOUT),  # same count, other rows: scales disagree
        (lambda m: _w(m).update(shape=[8, -24]), Reason.LIMIT),
        (lambda m: _w(m).update(shape=[8, 24.0]), Reason.BAD_MANIFEST),
        (lambda m: _w(m).update(shape=[True, 24]), Reason.BAD_MANIFEST),
        (lambda m: _w(m).update(shape=[2**40, 2**40]), Reason.LIMIT),
        (lambda m: _w(m).update(shape=[1] * 17), Reason.BAD_MANIFEST),
        (lambda m: _w(m).update(shape="8x24"), Reason.BAD_MANIFEST),
        (lambda m: _w(m).update(bits=13), Reason.BAD_MANIFEST),
        (lambda m: _w(m).update(bits=9), Reason.LAYOUT),  # 9..12 bits only in layout planes
        (lambda m: _w(m).update(bits=1), Reason.BAD_MANIFEST),
        (lambda m: _w(m).update(bits=True), Reason.BAD_MANIFEST),
        (lambda m: _w(m).update(bits=4.0), Reason.BAD_MANIFEST),
        (lambda m: _w(m).update(group_size=0), Reason.BAD_MANIFEST),
        (lambda m: _w(m).update(group_size=4), Reason.LAYOUT),
        (lambda m: _w(m).update(group_size=2**41), Reason.LIMIT),
        (lambda m: _w(m).update(layout="packed"), Reason.LAYOUT),
        (lambda m: _w(m).update(layout="trit"), Reason.LAYOUT),
        (lambda m: _w(m).update(layout=["byte"]), Reason.LAYOUT),
        (lambda m: _w(m).update(scheme="os.system('x')"), Reason.UNKNOWN_SCHEME),
        (lambda m: _w(m).update(scheme={"module": "x"}), Reason.UNKNOWN_SCHEME),
        (lambda m: _w(m).update(params=[]), Reason.BAD_MANIFEST),
        (lambda m: _w(m).update(dtype="int8"), Reason.BAD_MANIFEST),
        (lambda m: _w(m).update(kind="pickle"), Reason.BAD_MANIFEST),
        (lambda m: _w(m).update(extra=1), Reason.BAD_MANIFEST),
        (lambda m: _w(m).pop("lowrank"), Reason.BAD_MANIFEST),
        (lambda m: _w(m)["scales"].update(layout="zigzag"), Reason.LAYOUT),
        (lambda m: _w(m)["codes"].update(section="nope"), Reason.BAD_MANIFEST),
        (lambda m: m["tensors"][1]["data"].update(section="w:codes"), Reason.BAD_MANIFEST),  # used twice
        (lambda m: _w(m)["codes"].update(codec={"name": "raw", "params": {}}), Reason.BAD_MANIFEST),
        (lambda m: m["tensors"][1].update(dtype="complex64"), Reason.BAD_MANIFEST),
        (lambda m: m["tensors"][1].update(dtype="torch.bfloat16"), Reason.BAD_MANIFEST),
        (lambda m: m["tensors"][1].update(dtype="float32"), Reason.LAYOUT),
        (lambda m: m["tensors"][1].update(shape=[9]), Reason.LAYOUT),
        (lambda m: m["tensors"][1].update(name="w"), Reason.BAD_MANIFEST),
        (lambda m: m["tensors"].pop(), Reason.BAD_MANIFEST),  # its section belongs to nobody
        (lambda m: m["meta"].update(model_config=[1]), Reason.BAD_MANIFEST),
    ],
)
def test_entry_validation(edit, reason):
    if CODEC == "raw" and "codec" in getattr(edit, "__code__", None).co_names:
        pytest.skip("codec disagreement needs a codec other than raw")
    refused(tamper(edit), reason)


def _raw_artifact() -> bytes:
    return build_artifact([TensorEntry("w", quant((4, 6), 3), scale_layout="plain"),
                           TensorEntry("b", torch.tensor([True, False]))])


def _patch_section(data: bytes, index: int, new: bytes) -> bytes:
    """Replace section `index` (raw codec) and fix its length, CRC and the following offsets."""
    manifest, payload = split(data)
    secs = manifest["sections"]
    chunks = [payload[s["offset"] : s["offset"] + s["length"]] for s in secs]
    chunks[index] = new
    offset = 0
    for s, c in zip(secs, chunks):
        s.update(offset=offset, length=len(c), raw_length=len(c), crc32=zlib.crc32(c))
        offset += len(c)
    return seal(manifest, b"".join(chunks))


def test_code_symbols_out_of_range_are_refused():
    data = _raw_artifact()
    manifest, payload = split(data)
    codes = bytearray(payload[: manifest["sections"][0]["length"]])
    codes[0] = 7  # 3 bits: symbols 0..6
    refused(_patch_section(data, 0, bytes(codes)), Reason.LAYOUT)


def test_nonfinite_scales_and_bad_bools_are_refused():
    data = _raw_artifact()
    refused(_patch_section(data, 1, np.full(4, np.nan, dtype="<f2").tobytes()), Reason.BAD_MANIFEST)
    refused(_patch_section(data, 2, b"\x01\x02"), Reason.BAD_MANIFEST)


def test_lowrank_shape_checked():
    c = make_codec("raw", {})
    data = build_artifact([TensorEntry("w", quant((6, 8), 4), codec=c,
                                       lowrank=(quant((6, 2), 4), quant((2, 8), 4)))])
    refused(tamper(lambda m: _w(m)["lowrank"].update(rank=3), data), Reason.LAYOUT)
    refused(tamper(lambda m: _w(m)["lowrank"].update(rank=0), data), Reason.LAYOUT)
    refused(tamper(lambda m: _w(m)["lowrank"]["a"].update(shape=[6, 3]), data), Reason.LAYOUT)
    refused(tamper(lambda m: _w(m).update(lowrank={"rank": 2}), data), Reason.BAD_MANIFEST)


def test_scheme_params_become_plain_json():
    q = quant((4, 8), 4)
    q.params = {"k": np.float32(12.5), "grid": (0.9, np.float64(1.0)), "n": np.int64(3), "flag": True}
    got = loads_artifact(build_artifact([TensorEntry("w", q)])).quantized("w")
    assert got.params == {"k": 12.5, "grid": [0.9, 1.0], "n": 3, "flag": True}
    assert type(got.params["n"]) is int and type(got.params["flag"]) is bool
    q.params = {"bad": object()}
    with pytest.raises(QpackInputError):
        build_artifact([TensorEntry("w", q)])
    q.params = {"k": float("nan")}
    with pytest.raises(QpackInputError):
        build_artifact([TensorEntry("w", q)])


def test_group_larger_than_the_row_round_trips():
    q = quant((3, 10), 4, group_size=64)
    got = loads_artifact(build_artifact([TensorEntry("w", q)])).quantized("w")
    assert got.group_size == 64 and got.scales.shape == (3, 1) and np.array_equal(got.q, q.q)


def test_missing_tensor_name_is_a_plain_error():
    art = loads_artifact(small()[0])
    with pytest.raises(QpackError):
        art.quantized("nope")


def test_dtype_allowlist_matches_torch():
    for name, (td, np_dtype) in DTYPES.items():
        assert torch.empty(0, dtype=td).element_size() == np.dtype(np_dtype).itemsize, name


@pytest.mark.parametrize("codec", codec_names())
def test_forged_section_bytes_never_crash(codec):
    """Corrupt each payload byte and forge every checksum: decoding may refuse (QpackFormatError) or, where the
    codec has no integrity check of its own, return other values; nothing else may escape."""
    c = make_codec(codec, {})
    data = build_artifact([TensorEntry("w", quant((8, 40), 4, group_size=16), codec=c, scale_codec=c),
                           TensorEntry("n", torch.linspace(-1, 1, 16), codec=c)])
    manifest, payload = split(data)
    for i in range(len(payload)):
        bad = bytearray(payload)
        bad[i] ^= 0x5A
        m = json.loads(json.dumps(manifest))
        for rec in m["sections"]:
            rec["crc32"] = zlib.crc32(bytes(bad[rec["offset"] : rec["offset"] + rec["length"]]))
        try:
            got = loads_artifact(seal(m, bytes(bad))).tensors()
        except QpackFormatError:
            continue
        assert got["w"].shape == (8, 40) and got["n"].shape == (16,)


@pytest.mark.parametrize("seed", range(12))
def test_random_entries_round_trip(seed):
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(0, 4))
    shape = tuple(int(d) for d in rng.integers(1, 9, size=ndim))
    bits = int(rng.integers(2, 9))
    layout = str(rng.choice(["byte", "packed", "trit"] if bits == 2 else ["byte", "packed"]))
    group = [None, 1, 3, 8, 100][int(rng.integers(0, 5))]
    codec = make_codec(str(rng.choice(codec_names())), {})
    q = make_quantizer("rtn", bits, group).quantize(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)))
    art = loads_artifact(build_artifact([TensorEntry("t", q, layout=layout, codec=codec, scale_codec=codec)]))
    got = art.quantized("t")
    assert np.array_equal(got.q, q.q) and got.scales.numpy().tobytes() == q.scales.numpy().tobytes() and got.shape == shape
    assert torch.equal(art.tensor("t"), q.dequantize())


def test_plan_meta_of_older_artifacts_still_assembles():
    """Artifacts written before the plan recorded dtypes (row_splits, aliases, order only) load as they did."""
    from qpack.statedict import Plan, assemble

    a, b = quant((4, 8), 5, seed=1), quant((2, 8), 5, seed=2)
    meta = {"row_splits": {"w": {"parts": ["w#rows0-4", "w#rows4-6"], "shape": [6, 8]}},
            "aliases": {"tied": "w"}, "order": ["tied", "w", "g"]}
    art = loads_artifact(build_artifact([TensorEntry("w#rows0-4", a), TensorEntry("w#rows4-6", b),
                                         TensorEntry("g", torch.ones(3, dtype=torch.float16))], meta))
    sd = assemble(art)
    assert list(sd) == ["tied", "w", "g"] and sd["tied"] is sd["w"]
    assert torch.equal(sd["w"], torch.cat([a.dequantize(), b.dequantize()]))
    assert sd["g"].dtype == torch.float16  # no recorded dtype: as stored
    plan = Plan.from_meta(art.meta)
    assert plan.to_meta() == {**meta, "aliases": {"tied": "w"}, "dtypes": {}}
    with pytest.raises(QpackFormatError):
        Plan.from_meta({"dtypes": {"w": "complex64"}})
    with pytest.raises(QpackFormatError):
        assemble(loads_artifact(build_artifact([TensorEntry("w#rows0-4", a)], meta)))


def _col_scaled(rows: int = 6, cols: int = 5) -> Quantized:
    q = quant((rows, cols), 4, seed=7)
    col = torch.tensor([0.5, 1.0, 2.0, 0.75, 3.0][:cols], dtype=torch.float16)
    return Quantized(q.q, q.scales, q.shape, q.bits, q.scheme, None, {}, col)


def test_column_scales_round_trip_and_multiply_each_column():
    q = _col_scaled()
    got = loads_artifact(build_artifact([TensorEntry("w", q, scale_layout="plain")])).quantized("w")
    assert torch.equal(got.col_scale, q.col_scale) and torch.equal(got.q, q.q)
    # by hand: code * row scale * column multiplier, in float32
    want = np.asarray(q.q, np.float32) * np.asarray(q.scales, np.float32) * np.asarray(q.col_scale, np.float32)[None]
    assert np.array_equal(got.dequantize().numpy(), want)
    plain = Quantized(q.q, q.scales, q.shape, q.bits, q.scheme)
    assert not torch.equal(plain.dequantize(), got.dequantize())


@pytest.mark.parametrize("col", [[1.0, 0.0, 1.0], [1.0, -2.0, 1.0], [1.0, float("nan"), 1.0], [1.0, 1.0]])
def test_bad_column_scales_are_refused_by_writer_and_reader(col):
    q = quant((4, 3), 4)
    with pytest.raises(QpackInputError):
        Quantized(q.q, q.scales, q.shape, q.bits, q.scheme, None, {}, torch.tensor(col, dtype=torch.float16))
    good = build_artifact([TensorEntry("w", Quantized(q.q, q.scales, q.shape, q.bits, q.scheme, None, {},
                                                      torch.ones(3, dtype=torch.float16)),
                                       codec=make_codec("raw", {}), scale_codec=make_codec("raw", {}),
                                       scale_layout="plain")])
    forged = _patch_section(good, 2, np.asarray(col, dtype="<f2").tobytes())
    refused(forged, Reason.LAYOUT if len(col) != 3 else Reason.BAD_MANIFEST)


def test_column_scales_only_on_a_tensor_and_with_their_section():
    q = _col_scaled()
    data = build_artifact([TensorEntry("w", q, codec=make_codec("raw", {}), scale_codec=make_codec("raw", {}))])
    refused(tamper(lambda m: _w(m)["col_scale"].update(section="w:codes"), data), Reason.BAD_MANIFEST)
    refused(tamper(lambda m: _w(m).pop("col_scale"), data), Reason.BAD_MANIFEST)  # its section belongs to nobody
    plain = build_artifact([TensorEntry("w", quant((6, 5), 4), codec=make_codec("raw", {}),
                                        lowrank=(quant((6, 2), 4), quant((2, 5), 4)))])

    def onto_factor(m):
        _w(m)["lowrank"]["a"]["col_scale"] = _w(m)["scales"]

    refused(tamper(onto_factor, plain), Reason.BAD_MANIFEST)


def test_writer_refuses_column_scales_on_a_factor():
    with pytest.raises(QpackInputError, match="column scales"):
        build_artifact([TensorEntry("w", quant((6, 5), 4), lowrank=(_col_scaled(6, 2), quant((2, 5), 4)))])

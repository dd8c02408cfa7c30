"""The `ans_cols` codec: one ANS table per class of columns; round trips, size against an independently computed
per-class entropy, refusal of corrupt frames, compress's use of it, and the exported loader's parity."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from qpack.artifact import TensorEntry, read_artifact, write_artifact
from qpack.codecs import CodecError, make_codec
from qpack.codecs.ans_codec import _varint
from qpack.compress import compress
from qpack.errors import QpackInputError
from qpack.loader import parse_codecs
from qpack.quant.base import Quantized

from codecframes import assert_damage_never_misdecodes, assert_shipped_loader_matches


def two_spreads(seed: int = 0, rows: int = 256, cols: int = 128, narrow: float = 0.6, wide: float = 8.0):
    """int6 symbols (offset 31) whose columns are Laplace with one of two spreads, the two kinds shuffled;
    returns (rows x cols uint8, True for the narrow columns)."""
    rng = np.random.default_rng(seed)
    is_narrow = rng.permutation(np.arange(cols) < cols // 2)
    scale = np.where(is_narrow, narrow, wide)
    x = np.clip(np.round(rng.laplace(0.0, scale, (rows, cols))), -31, 31) + 31
    return x.astype(np.uint8), is_narrow


def entropy_bits(values: np.ndarray) -> float:
    """Empirical order-0 entropy of `values` in bits, times their count."""
    _, counts = np.unique(values, return_counts=True)
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def frame_head(frame: bytes) -> tuple[int, int]:
    """(width, classes) of a frame: varints after version and CRC (classes 0 for a plain frame)."""
    vals, i = [], 5
    for _ in range(2):
        v, shift = 0, 0
        while True:
            v |= (frame[i] & 127) << shift
            i += 1
            if frame[i - 1] < 128:
                break
            shift += 7
        vals.append(v)
        if vals[0] == 0:
            return 0, 0
    return vals[0], vals[1]


@pytest.mark.parametrize("data", [
    b"", b"\x05", b"\x00" * 4096, bytes(range(256)) * 64, two_spreads()[0].tobytes(),
    np.random.default_rng(2).integers(0, 256, 1001, dtype=np.uint8).tobytes(),
], ids=["empty", "one", "constant", "all256_rows", "two_spreads", "odd"])
@pytest.mark.parametrize("params", [{}, {"width": 128}, {"width": 7, "lane_bytes": 64}, {"width": 1001}])
def test_round_trip(data, params):
    codec = make_codec("ans_cols", params)
    assert codec.decode(codec.encode(data), len(data)) == data


def test_classes_code_near_the_per_class_entropy_and_far_under_ans():
    x, is_narrow = two_spreads()
    data = x.tobytes()
    frame = make_codec("ans_cols", {"width": 128}).encode(data)
    w, k = frame_head(frame)
    assert w == 128 and k >= 2
    # the entropy with the true split, computed here from the generator's labels
    floor = (entropy_bits(x[:, is_narrow]) + entropy_bits(x[:, ~is_narrow])) / 8
    ans = len(make_codec("ans").encode(data))
    assert len(frame) < 0.9 * ans
    assert len(frame) < floor * 1.02 + 400  # tables and class ids
    # every class holds one kind of column: the split found is the true one
    from qpack.loader.parts.ans_cols_part import ans_cols_parse

    _, _, ids, _ = ans_cols_parse(frame, len(data))
    for c in range(k):
        kinds = set(is_narrow[ids == c].tolist())
        assert len(kinds) == 1


def test_alike_columns_cost_no_more_than_ans_plus_six_bytes():
    rng = np.random.default_rng(4)
    data = (np.clip(np.round(rng.laplace(0, 4.0, 256 * 128)), -31, 31) + 31).astype(np.uint8).tobytes()
    frame = make_codec("ans_cols", {"width": 128}).encode(data)
    assert frame_head(frame) == (0, 0)
    assert len(frame) == len(make_codec("ans").encode(data)) + 6


def test_bad_parameters():
    for params in ({"width": -1}, {"width": 1 << 25}, {"lane_bytes": 0}, {"width": "8"}, {"group": 4}):
        with pytest.raises(QpackInputError):
            make_codec("ans_cols", params)


def _frame(width: int, k: int, ids: list[int], inner: bytes, crc: int = 0) -> bytes:
    nb = (k - 1).bit_length()
    bits = np.array([(i >> b) & 1 for i in ids for b in range(nb)], dtype=np.uint8)
    packed = np.packbits(bits, bitorder="little").tobytes() if bits.size else b""
    return b"\x01" + struct.pack("<I", crc) + _varint(width) + _varint(k) + packed + inner


def test_hostile_frames_are_refused():
    codec = make_codec("ans_cols")
    x = np.arange(32, dtype=np.uint8).reshape(4, 8)  # 4 rows of 8 columns
    ids = [0, 1, 0, 1, 0, 1, 0, 1]
    coded = np.concatenate([x[:, np.array(ids) == c].reshape(-1) for c in (0, 1)])
    inner = make_codec("ans").encode(coded.tobytes())
    cases = {  # frame -> what the refusal must say (each check is the first to see its defect)
        "version": (b"\x02" + bytes(8), "unknown frame version"),
        "short": (b"\x01\x00", "truncated"),
        "width does not divide": (_frame(5, 2, ids[:5], inner), "does not divide"),
        "no class": (_frame(8, 0, [], inner), "cannot cut"),
        "one class": (_frame(8, 1, [], inner), "cannot cut"),
        "too many classes": (_frame(8, 17, ids, inner), "cannot cut"),
        "an empty class": (_frame(8, 7, ids, inner), "cannot cut"),  # ceil(8/7) = 2: 6 classes take 12 columns
        "ids cut short": (_frame(8, 2, ids, b"")[:-1], "truncated"),
        "class sizes": (_frame(8, 2, [0, 0, 0, 0, 0, 1, 1, 1], inner), "sizes"),
        "class id past the count": (_frame(8, 3, [0, 0, 0, 1, 1, 1, 3, 2], inner), "sizes"),
        "huge varint": (b"\x01" + bytes(4) + b"\xff" * 10 + b"\x01", "varint longer"),
    }
    for label, (frame, says) in cases.items():
        with pytest.raises(CodecError, match=f"ans_cols.*{says}"):
            codec.decode(frame, 32)
    # The same frame with its CRC right decodes: the refusals above come from the checks, not the CRC.
    good = _frame(8, 2, ids, inner, zlib.crc32(x.tobytes()))
    assert codec.decode(good, 32) == x.tobytes()
    with pytest.raises(CodecError, match="CRC"):
        codec.decode(_frame(8, 2, ids, inner, 1), 32)
    with pytest.raises(CodecError, match="inner frame"):
        codec.decode(_frame(8, 2, ids, inner[:-3], zlib.crc32(x.tobytes())), 32)


def test_corrupted_frames_never_decode_to_other_bytes():
    x, _ = two_spreads(seed=5, rows=64, cols=64)
    data = x.tobytes()
    codec = make_codec("ans_cols", {"width": 64})
    frame = codec.encode(data)
    assert frame_head(frame)[0] == 64
    assert_damage_never_misdecodes(codec, frame, data, head=24)


def _artifact(path, x: np.ndarray):
    """An artifact with one int6 tensor holding `x` as its codes, stored with ans_cols, and a small one."""
    q = torch.from_numpy(x.astype(np.int16) - 31).to(torch.int8)
    scales = torch.full((q.shape[0], 1), 0.01, dtype=torch.float16)
    qz = Quantized(q, scales, tuple(q.shape), 6, "rtn")
    write_artifact(path, [TensorEntry("proj.weight", qz, codec=make_codec("ans_cols"), layout="byte"),
                          TensorEntry("norm.weight", torch.ones(8), codec=make_codec("ans_cols"))])


def test_artifact_gives_the_codec_its_rows_and_the_loader_matches_qpack_load(tmp_path):
    x, _ = two_spreads(seed=7)
    path = tmp_path / "m.qpk"
    _artifact(path, x)
    art = read_artifact(path)
    frame = art.container.encoded("proj.weight:codes")
    assert frame_head(frame)[0] == 128  # the codes' row width, set by the artifact writer
    assert parse_codecs("ans_cols") == ["raw", "ans", "ans_cols"]  # its part calls the ans part
    assert_shipped_loader_matches(tmp_path, ["ans_cols"], path)
    from qpack.loader.parts.ans_cols_part import _ans_cols
    from qpack.loader.parts.base import QpkLoadError

    bad = frame[:1] + struct.pack("<I", zlib.crc32(frame) & 0xFFFF) + frame[5:]
    with pytest.raises(QpkLoadError, match="CRC"):
        _ans_cols([(bad, x.size, {})])
    assert _ans_cols([(frame, x.size, {})]) == [x.tobytes()]


def test_compress_stores_a_matrix_with_dead_inputs_smaller(tmp_path):
    """A matrix whose inputs are half dead (columns near zero, as after a ReLU unit that never fires): at equal
    codes, compress with ans_cols in its codec list stores it smaller than with ans alone."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g) * 0.02
    w[:, torch.randperm(256, generator=g)[:128]] *= 0.03
    sd = {"mlp.proj.weight": w}
    plain = compress(sd, tmp_path / "a.qpk", scheme="rtn", fixed_bits=6, codecs=("ans",))
    cols = compress(sd, tmp_path / "c.qpk", scheme="rtn", fixed_bits=6, codecs=("ans", "ans_cols"))
    a, c = read_artifact(tmp_path / "a.qpk"), read_artifact(tmp_path / "c.qpk")
    assert torch.equal(a.quantized("mlp.proj.weight").q, c.quantized("mlp.proj.weight").q)
    assert c.container.section_info("mlp.proj.weight:codes").codec["name"] == "ans_cols"
    assert cols.bytes_total < 0.9 * plain.bytes_total

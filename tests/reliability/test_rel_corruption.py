"""Part 2: exhaustive corruption of small reference artifacts (ANS, zstd, brotli, lzma; golden files: long pass).

Every byte flipped two ways (lowest bit, all bits), every truncation, and 1, 7 and 4,096 trailing junk
bytes: each variant must raise QpackFormatError, from parsing or from decoding every tensor. Anything else
(another exception, or a file that loads) is a finding.
"""
from __future__ import annotations

import pytest

from qpack.artifact import loads_artifact
from qpack.errors import QpackFormatError
from relhelp import GOLDEN, record


def variants(data: bytes):
    for i in range(len(data)):
        for mask in (0x01, 0xFF):
            yield f"byte {i} ^ 0x{mask:02x}", data[:i] + bytes([data[i] ^ mask]) + data[i + 1:]
    for n in range(len(data)):
        yield f"truncated to {n}", data[:n]
    for n in (1, 7, 4096):
        yield f"{n} junk bytes", data + bytes((i * 37 + 11) & 0xFF for i in range(n))


def sweep(data: bytes) -> tuple[int, list[str]]:
    tried, bad = 0, []
    for what, blob in variants(data):
        tried += 1
        try:
            loads_artifact(blob, "ref.qpk").tensors()
            bad.append(f"{what}: loaded")
        except QpackFormatError:
            pass
        except Exception as exc:  # a finding: the reader must only ever raise QpackFormatError
            bad.append(f"{what}: {type(exc).__name__}: {exc}")
    return tried, bad


def reference(codec_name: str) -> bytes:
    """A small reference artifact: int4 codes + fp16 scales + an fp16 passthrough, all through one codec."""
    import numpy as np
    import torch

    from qpack.artifact import TensorEntry, build_artifact
    from qpack.codecs import make_codec
    from qpack.quant.base import Quantized

    rng = np.random.default_rng(3)
    q = np.clip(np.round(rng.laplace(0, 2, size=(8, 24))), -7, 7).astype(np.int8)
    scales = (rng.random((8, 1)) * 0.01 + 0.001).astype(np.float16)
    codec = make_codec(codec_name, {})
    entries = [TensorEntry("w", Quantized(q, scales, (8, 24), 4, "rtn"), codec=codec, scale_codec=codec),
               TensorEntry("g", torch.linspace(-1, 1, 8).to(torch.float16), codec=codec)]
    return build_artifact(entries, {"libraries": {}, "qpack_version": "ref"})


@pytest.mark.parametrize("codec", ["ans", "zstd", "brotli", "lzma"])
def test_every_corruption_is_detected(codec):
    data = reference(codec)
    assert loads_artifact(data).tensors()["w"].shape == (8, 24)  # the reference itself is valid
    tried, bad = sweep(data)
    assert tried == 3 * len(data) + 3
    record("2 corruption", artifact=f"{codec} reference", bytes=len(data), variants=tried, undetected=len(bad))
    assert bad == [], f"{len(bad)} of {tried} variants not refused cleanly, e.g. {bad[:5]}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ans.qpk", "zstd.qpk", "brotli.qpk", "lzma.qpk", "zlib.qpk", "raw.qpk"])
def test_every_corruption_of_golden_files_is_detected(name):
    data = (GOLDEN / name).read_bytes()
    tried, bad = sweep(data)
    record("2 corruption", artifact=f"golden {name}", bytes=len(data), variants=tried, undetected=len(bad))
    assert bad == [], f"{len(bad)} of {tried} variants not refused cleanly, e.g. {bad[:5]}"

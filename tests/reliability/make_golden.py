"""Write the golden artifacts: one per built-in codec, each a few KB, plus golden.json with expected SHA-256s.

    python tests/reliability/make_golden.py          # only when adding a codec; never to "fix" a failing test

The expected tensor hashes are computed here from the source integers with numpy (q * scale in float32,
plus A @ B for LQER), independently of qpack's reader. Once committed, these files must decode bit-exactly
in every future version of qpack: a change that breaks them breaks users' files.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from relhelp import GOLDEN  # noqa: E402

CODECS = {
    "raw": {},
    "zlib": {"level": 9},
    "zstd": {"level": 19},
    "lzma": {"preset": 6},
    "brotli": {"quality": 11},
    "ans": {"group": 0},
}


def _quant(rng, rows: int, cols: int, bits: int, group: int | None):
    from qpack.quant.base import Quantized, n_groups, qmax

    m = qmax(bits)
    q = np.clip(np.round(rng.laplace(0, m / 3, size=(rows, cols))), -m, m).astype(np.int8)
    scales = (rng.random((rows, n_groups(cols, group))) * 0.02 + 0.001).astype(np.float16)
    return Quantized(q, scales, (rows, cols), bits, "rtn", group)


def expected_value(q) -> np.ndarray:
    """Dequantize as docs/FORMAT.md section 3 defines it, in numpy."""
    s = q.scales.numpy().astype(np.float32)
    if q.group_size:
        s = np.repeat(s, q.group_size, axis=1)[:, : q.q.shape[1]]
    return (q.q.numpy().astype(np.float32) * s).reshape(q.shape)


def sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def golden_entries(codec_name: str):
    """The tensors of one golden file and their expected (dtype, shape, sha256) computed independently."""
    from qpack.artifact import TensorEntry
    from qpack.codecs import make_codec

    rng = np.random.default_rng(20240520)
    codec = make_codec(codec_name, CODECS[codec_name])
    entries, expect = [], {}
    for name, bits, layout, group in (("w4_byte", 4, "byte", None), ("w6_packed", 6, "packed", 16),
                                      ("w2_trit", 2, "trit", None), ("w8_byte", 8, "byte", 32),
                                      ("w3_packed", 3, "packed", None)):
        q = _quant(rng, 24, 40, bits, group)
        entries.append(TensorEntry(name, q, layout=layout, codec=codec, scale_codec=codec))
        expect[name] = ("float32", list(q.shape), sha(expected_value(q)))
    base = _quant(rng, 16, 24, 5, None)
    a, b = _quant(rng, 16, 2, 8, None), _quant(rng, 2, 24, 8, None)
    entries.append(TensorEntry("w5_lqer", base, layout="byte", codec=codec, scale_codec=codec, lowrank=(a, b)))
    lq = expected_value(base) + expected_value(a) @ expected_value(b)
    expect["w5_lqer"] = ("float32", [16, 24], sha(lq.astype(np.float32)))
    g = torch.Generator().manual_seed(5)
    for name, t in (("norm_fp16", torch.randn(40, generator=g).to(torch.float16)),
                    ("gain_bf16", torch.randn(3, 8, generator=g).to(torch.bfloat16)),
                    ("bias_fp32", torch.randn(24, generator=g)),
                    ("steps_i64", torch.arange(-3, 9, dtype=torch.int64)),
                    ("mask_bool", torch.tensor([True, False, True, True]))):
        entries.append(TensorEntry(name, t, codec=codec))
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        expect[name] = (str(t.dtype).removeprefix("torch."), list(t.shape), sha(raw.numpy()))
    return entries, expect


def main() -> None:
    from qpack.artifact import build_artifact, library_versions

    GOLDEN.mkdir(parents=True, exist_ok=True)
    index = {}
    for name in CODECS:
        entries, expect = golden_entries(name)
        data = build_artifact(entries, {"libraries": {}, "qpack_version": "golden", "model_config": {"arch": "none"}})
        assert len(data) <= 64 * 1024
        (GOLDEN / f"{name}.qpk").write_bytes(data)
        index[f"{name}.qpk"] = {"codec": name, "file_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                                "tensors": {k: {"dtype": d, "shape": s, "sha256": h} for k, (d, s, h) in expect.items()}}
        print(f"{name}.qpk: {len(data):,} bytes")
    index["libraries"] = library_versions()  # the encoders that made these bytes (decoding must not depend on it)
    (GOLDEN / "golden.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

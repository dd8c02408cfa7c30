"""Context for the entropy coder, measured on real quantized weights: order-0 entropy against the options.

For each width, the checkpoint is compressed with `qpack compress --bits B --codec raw` (default scheme) and
every codes section, as an artifact stores it (one symbol per byte), is measured; all figures are sums over
sections, in bytes:
  H0            order-0 empirical entropy, no table (the floor of any order-0 coder)
  prev-ctx      entropy given the previous symbol's class |prev - mode| in {0, 1, 2, >2}, plus 4 ans tables
  row-class     entropy given the row's class (rows in 4 quartiles of their std; width known here), plus 4
                tables and 2 bits per row
  ans           the `ans` codec (order-0, exact table)
  ans_ctx       the `ans_ctx` codec (rows coded against a reference row where that pays)
  brotli-11     brotli at quality 11
  ans|zstd      the smaller of ans and zstd per section (what compress's default codec list stores)
Encode and decode times are ratios to ans in the same run (a shared machine: no absolute timing is a fact).

    python benchmarks/codecs/ans_ctx.py /work/runs/cpu-smoke/final.pt --bits 4,5,6,8 --out benchmarks/codecs/ans_ctx.md
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import brotli
import numpy as np

from qpack.artifact import read_artifact
from qpack.codecs import make_codec
from qpack.codecs.ans_codec import _varint
from qpack.quant.base import Quantized


def entropy_bytes(x: np.ndarray) -> float:
    c = np.bincount(x, minlength=256)
    c = c[c > 0].astype(np.float64)
    return float(-(c * np.log2(c / c.sum())).sum()) / 8


def table_bytes(x: np.ndarray) -> int:
    """What an `ans` frame spends on the exact frequency table of `x`."""
    c = np.bincount(x, minlength=256)
    nz = np.flatnonzero(c)
    return 2 + sum(len(_varint(int(v))) for v in c[nz[0] : nz[-1] + 1]) if nz.size else 0


def conditional_bytes(x: np.ndarray, ctx: np.ndarray) -> float:
    return sum(entropy_bytes(x[ctx == k]) + table_bytes(x[ctx == k]) for k in np.unique(ctx))


def raw_codes_artifact(ckpt: str, bits: int, folder: Path) -> Path:
    """`qpack compress CKPT --bits B --codec raw` into `folder`: every codes section as stored, uncompressed."""
    path = Path(folder) / f"m{bits}.qpk"
    subprocess.run([sys.executable, "-m", "qpack.cli", "compress", ckpt, "--bits", str(bits), "--codec", "raw",
                    "-o", str(path), "-q"], check=True, capture_output=True)
    return path


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure(path: Path) -> dict:
    """Sums over the artifact's codes sections (see the module docstring)."""
    art = read_artifact(path)
    ans, ctx, zstd = make_codec("ans"), make_codec("ans_ctx"), make_codec("zstd")
    tot = dict.fromkeys(["symbols", "H0", "prev-ctx", "row-class", "ans", "ans_ctx", "brotli-11", "ans|zstd",
                         "enc_ans", "enc_ctx", "dec_ans", "dec_ctx"], 0.0)
    for name in art.names():
        qz = art.quantized(name)
        if not isinstance(qz, Quantized):
            continue
        m = (1 << (qz.bits - 1)) - 1
        grid = (qz.q.numpy().astype(np.int16) + m).astype(np.uint8)
        x = grid.reshape(-1)
        raw = x.tobytes()
        mode = int(np.argmax(np.bincount(x, minlength=256)))
        prev = np.abs(np.concatenate([[mode], x[:-1]]).astype(np.int16) - mode)
        sd = grid.astype(np.float64).std(axis=1)
        rc = np.searchsorted(np.quantile(sd, [0.25, 0.5, 0.75]), sd, side="right")
        a, ta = timed(lambda: ans.encode(raw))
        c, tc = timed(lambda: ctx.encode(raw))
        da, tda = timed(lambda: ans.decode(a, len(raw)))
        dc, tdc = timed(lambda: ctx.decode(c, len(raw)))
        assert da == raw and dc == raw
        for k, v in {"symbols": x.size, "H0": entropy_bytes(x),
                     "prev-ctx": conditional_bytes(x, np.minimum(prev, 3)),
                     "row-class": conditional_bytes(x, np.repeat(rc, grid.shape[1])) + grid.shape[0] * 2 / 8,
                     "ans": len(a), "ans_ctx": len(c), "brotli-11": len(brotli.compress(raw, quality=11)),
                     "ans|zstd": min(len(a), len(zstd.encode(raw))),
                     "enc_ans": ta, "enc_ctx": tc, "dec_ans": tda, "dec_ctx": tdc}.items():
            tot[k] += v
    return tot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--bits", default="4,5,6,8")
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args()
    cols = ["H0", "prev-ctx", "row-class", "ans", "ans_ctx", "brotli-11", "ans|zstd"]
    lines = [f"checkpoint {args.ckpt}; bytes summed over codes sections; % against ans", "",
             "| bits | symbols | " + " | ".join(cols) + " | ans_ctx encode / ans | ans_ctx decode / ans |",
             "|---" * (len(cols) + 4) + "|"]
    with tempfile.TemporaryDirectory() as tmp:
        for b in [int(v) for v in args.bits.split(",")]:
            t = measure(raw_codes_artifact(args.ckpt, b, Path(tmp)))
            cells = [f"{t[c]:,.0f} ({t[c] / t['ans'] - 1:+.2%})" for c in cols]
            lines.append(f"| {b} | {t['symbols']:,.0f} | " + " | ".join(cells)
                         + f" | {t['enc_ctx'] / t['enc_ans']:.1f}x | {t['dec_ctx'] / t['dec_ans']:.2f}x |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

"""Codes past 8 bits (layout "planes"): what each codec stores against the codes' own order-0 entropy.

Gaussian codes of a given standard deviation (in steps; the default step menu's finest step, 0.015 std, gives
about 67 on a Gaussian matrix) are stored as `qpack compress` stores 9-12 bit uniform codes: zigzag symbols,
the high bytes then the low bytes, ans with one table per plane. Columns, in bytes:
  H0           order-0 empirical entropy of the codes themselves (no table): the floor of an order-0 coder
  ans/plane    the planes under ans with one table per plane (what compress stores)
  ans/1 table  the same bytes under ans with one table for both planes (what per-plane tables avoid)
  zstd-22, brotli-11   the planes under those codecs

    python benchmarks/codecs/planes.py --out benchmarks/codecs/planes.md
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from qpack.artifact import TensorEntry, build_artifact, loads_artifact
from qpack.codecs import make_codec
from qpack.quant import Quantized

STDS = (25, 50, 100, 200, 400, 800)


def entropy_bytes(sym: np.ndarray) -> float:
    """Order-0 empirical entropy of `sym`, in bytes."""
    _, counts = np.unique(sym, return_counts=True)
    return float(-(counts * np.log2(counts / counts.sum())).sum() / 8)


def row(std: float, rows: int, cols: int, seed: int) -> dict[str, float]:
    """Bytes of one (rows, cols) matrix of Gaussian 12-bit codes of standard deviation `std` under each coder."""
    g = torch.Generator().manual_seed(seed)
    codes = (torch.randn(rows, cols, generator=g) * std).round().clamp(-2047, 2047).to(torch.int16)
    q = Quantized(codes, torch.full((rows, 1), 1e-3, dtype=torch.float16), (rows, cols), 12, "uniform")
    art = loads_artifact(build_artifact([TensorEntry("w", q, layout="auto", codec=make_codec("ans", {}))]))
    planes = art.container.section(art.entry("w")["codes"]["section"])
    return {
        "H0": entropy_bytes(codes.numpy().reshape(-1)),
        "ans/plane": art.section_bytes("w")["codes"],
        "ans/1 table": len(make_codec("ans", {}).encode(planes)),
        "zstd-22": len(make_codec("zstd", {"level": 22}).encode(planes)),
        "brotli-11": len(make_codec("brotli", {"quality": 11}).encode(planes)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=None, help="write the table here as markdown too")
    args = ap.parse_args()
    cols = ["H0", "ans/plane", "ans/1 table", "zstd-22", "brotli-11"]
    lines = [f"Gaussian 12-bit codes, {args.rows} x {args.cols} ({args.rows * args.cols:,} codes); bytes, "
             "% against H0", "", "| std (steps) | bits/code H0 | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 2) + "|"]
    for i, std in enumerate(STDS):
        r = row(std, args.rows, args.cols, seed=i)
        cells = [f"{r['H0']:,.0f}"] + [f"{r[c]:,} ({r[c] / r['H0'] - 1:+.2%})" for c in cols[1:]]
        lines.append(f"| {std} | {8 * r['H0'] / (args.rows * args.cols):.3f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n\n```\npython benchmarks/codecs/planes.py --out "
                            f"{args.out}\n```\n")


if __name__ == "__main__":
    main()

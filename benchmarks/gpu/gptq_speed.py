"""GPTQ at widths 2..8 on one matrix: one make_quantizer call per width, against one preparation swept per width
(quantize_widths, stacked=False) and one preparation with all widths in one sweep (stacked=True).

    python benchmarks/gpu/gptq_speed.py --device cuda --rows 1536 --cols 512

The per-width paths give the same codes (checked); the stacked one is checked to agree on >= 99.9% of codes.
The figures are ratios of wall times in the same run (best of --repeat).
"""
from __future__ import annotations

import argparse
import time

import torch

from qpack.quant import make_quantizer
from qpack.quant.gptq import quantize_widths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=1536)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(args.rows, args.cols, generator=g)
    X = torch.randn(4 * args.cols, args.cols, generator=g)
    W, H = W.to(device), (X.T @ X / X.shape[0]).to(device)
    widths = range(2, 9)
    best = {"per_width": float("inf"), "prepared": float("inf"), "stacked": float("inf")}
    for _ in range(args.repeat):
        _sync(device)
        t = time.perf_counter()
        sep = {b: make_quantizer("gptq", b).quantize(W, H) for b in widths}
        _sync(device)
        best["per_width"] = min(best["per_width"], time.perf_counter() - t)
        t = time.perf_counter()
        one = quantize_widths(W, H, widths, stacked=False)
        _sync(device)
        best["prepared"] = min(best["prepared"], time.perf_counter() - t)
        t = time.perf_counter()
        stk = quantize_widths(W, H, widths, stacked=True)
        _sync(device)
        best["stacked"] = min(best["stacked"], time.perf_counter() - t)
        assert all(torch.equal(sep[b].q, one[b].q) for b in widths)
        assert all(float((sep[b].q == stk[b].q).double().mean()) >= 0.999 for b in widths)
    base = best["per_width"]
    print(f"gptq {args.rows}x{args.cols} widths 2..8 on {device} (best of {args.repeat}): one quantizer per width "
          f"{base:.3f} s; prepared once {best['prepared']:.3f} s ({base / best['prepared']:.2f}x); "
          f"prepared once, widths stacked {best['stacked']:.3f} s ({base / best['stacked']:.2f}x)")


if __name__ == "__main__":
    main()

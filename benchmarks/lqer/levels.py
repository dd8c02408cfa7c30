"""LQER factor levels: qpack's symmetric codes against the 2026-04-27 record's asymmetric ones, at equal rank.

For every matrix of a checkpoint (>= 32,768 weights), E = W - RTN_int4(W); A = the top-r left singular vectors
of E at 2 bits with one scale, B refitted by least squares to the stored A at 4 bits with one scale per 64
values; both scales searched over shrunk ranges (as qpack.quant.lqer does). Symmetric: A in {-1, 0, 1}, B in
-7..7 (qpack). Asymmetric: A in -2..1, B in -8..7 (the record's _lqer_pack_asym ranges, scale = range/(hi + 0.5)).
Printed: the mean share of ||E||^2 left after the correction, and the factors' codes at their order-0 entropy
(what qpack's ans stores, tables aside), summed over matrices.

    python benchmarks/lqer/levels.py /work/runs/cpu-small2/final.pt
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from qpack.checkpoint import load_state_dict
from qpack.quant.base import make_quantizer
from qpack.quant.lqer import error_svd, quantize_factor

_SHRINK = torch.linspace(0.3, 1.0, 15, dtype=torch.float64)


def entropy_bytes(q: torch.Tensor) -> float:
    _, c = np.unique(q.reshape(-1).numpy(), return_counts=True)
    return float(-(c * np.log2(c / c.sum())).sum()) / 8


def asym_codes(x: torch.Tensor, lo: int, hi: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in lo..hi and their values, one fp16 scale for all of x (group None) or per `group` values."""
    xg = x.reshape(1, -1) if group is None else x.reshape(-1, group)
    amax = xg.abs().amax(dim=1, keepdim=True)
    best = torch.full_like(amax, float("inf"))
    bq, bd = torch.zeros_like(xg), torch.zeros_like(xg)
    for shrink in _SHRINK:
        s = (amax * shrink / (hi + 0.5)).clamp_min(1e-12).to(torch.float16).to(torch.float64)
        q = (xg / s).round().clamp(lo, hi)
        err = (xg - q * s).square().sum(dim=1, keepdim=True)
        m = err < best
        best, bq, bd = torch.where(m, err, best), torch.where(m, q, bq), torch.where(m, q * s, bd)
    return bq.reshape(x.shape).to(torch.int8), bd.reshape(x.shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--ranks", default="4,8")
    args = ap.parse_args()
    sd = load_state_dict(args.ckpt)[0]
    res: dict[tuple[int, str], list[float]] = {}
    for w in sd.values():
        if w.ndim != 2 or w.numel() < 32768:
            continue
        w = w.float()
        E = (w - make_quantizer("rtn", 4, None).quantize(w).dequantize().reshape(w.shape)).to(torch.float64)
        U, _, _ = error_svd(E)
        for r in [int(v) for v in args.ranks.split(",")]:
            qa = quantize_factor(U[:, :r], 2, None, shared=True)
            Aq = qa.dequantize().to(torch.float64)
            qb = quantize_factor(torch.linalg.pinv(Aq) @ E, 4, 64)
            sym = (E - Aq @ qb.dequantize().to(torch.float64), entropy_bytes(qa.q) + entropy_bytes(qb.q))
            ca, Aa = asym_codes(U[:, :r].to(torch.float64), -2, 1, None)
            cb, Ba = asym_codes(torch.linalg.pinv(Aa) @ E, -8, 7, 64)
            asy = (E - Aa @ Ba, entropy_bytes(ca) + entropy_bytes(cb))
            for kind, (left, nbytes) in (("symmetric (qpack)", sym), ("asymmetric (record)", asy)):
                acc = res.setdefault((r, kind), [0.0, 0.0, 0])
                acc[0] += float(left.square().sum() / E.square().sum())
                acc[1] += nbytes
                acc[2] += 1
    print("| rank | levels | error left (mean share) | factor codes, bytes at H0 | matrices |")
    print("|---|---|---|---|---|")
    for (r, kind), (left, nbytes, n) in sorted(res.items(), key=lambda kv: (kv[0][0], kv[0][1] != "symmetric (qpack)")):
        print(f"| {r} | {kind} | {left / n:.4f} | {nbytes:,.0f} | {n} |")


if __name__ == "__main__":
    main()

"""Peak memory and time of `qpack compress --budget` on a large synthetic state dict (GPT-2-small-like, ~124M).

    python benchmarks/memory_large.py --layers 12 --width 768 --vocab 50257 --bits-per-param 4

Builds the state dict in memory (random weights: sizes, not quality, are what is measured), compresses it with
the data-free defaults to a budget, and prints peak RSS against the model's fp32 size.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--bits-per-param", type=float, default=4.0)
    ap.add_argument("--scheme", default="rtn")
    args = ap.parse_args()

    from qpack.compress import CompressConfig, compress

    g = torch.Generator().manual_seed(0)
    d = args.width
    sd = {"wte.weight": torch.randn(args.vocab, d, generator=g) * 0.02}
    for i in range(args.layers):
        p = f"h.{i}."
        sd[p + "attn.c_attn.weight"] = torch.randn(3 * d, d, generator=g) * 0.02
        sd[p + "attn.c_proj.weight"] = torch.randn(d, d, generator=g) * 0.02
        sd[p + "mlp.c_fc.weight"] = torch.randn(4 * d, d, generator=g) * 0.02
        sd[p + "mlp.c_proj.weight"] = torch.randn(d, 4 * d, generator=g) * 0.02
        sd[p + "ln_1.weight"] = torch.ones(d)
        sd[p + "ln_2.weight"] = torch.ones(d)
    params = sum(t.numel() for t in sd.values())
    fp32 = 4 * params
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    budget = int(args.bits_per_param * params / 8)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = compress(sd, Path(tmp) / "m.qpk", CompressConfig(budget=budget, scheme=args.scheme, codecs=("ans",)))
        sec = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"params": params, "fp32_bytes": fp32, "budget": budget, "bytes_total": res.bytes_total,
                      "bits_per_param": res.bits_per_param, "seconds": round(sec, 1),
                      "rss_before_compress": base_rss, "peak_rss": peak,
                      "peak_over_fp32": round(peak / fp32, 2)}, indent=2))


if __name__ == "__main__":
    main()

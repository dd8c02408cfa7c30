"""GPTQ compress of a trainer checkpoint with the model, the Hessians and the quantizers on one device.

    python benchmarks/gpu/compress_device.py runs/golf/final.pt --calib data --budget 16MB -o golf.qpk --device cuda

Prints one line per stage (load, hessians, each compress stage) and, with --json PATH, writes them there.
`qpack compress` does the same on the CPU; this script moves the state dict and the Hessians to --device
first, so the whole quantize stage (GPTQ at every width, GPTQ-lite, LQER) runs there.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from qpack.calibrate import build_model, collect, load_calibration_tokens
from qpack.checkpoint import load_state_dict
from qpack.compress import compress
from qpack.errors import QpackError, QpackInputError
from qpack.units import parse_size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--calib", required=True, help="shard folder with calibration tokens")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--budget", required=True)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None, help="write the stage times and totals here")
    args = ap.parse_args(argv)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise QpackInputError("--device cuda: no CUDA device is available")
        stages: dict[str, float] = {}
        t0 = time.perf_counter()
        sd, config, extra = load_state_dict(args.ckpt)
        stages["load"] = time.perf_counter() - t0

        t = time.perf_counter()
        tokens = load_calibration_tokens(args.calib, args.calib_tokens, None, (config or {}).get("vocab_size"))
        net = build_model(sd, config, None).float().to(device)
        length = int((config or {}).get("seq_len") or extra.get("seq_len") or 512)  # the trainer stores it beside
        hessians = collect(net, tokens, min(length, len(tokens)))
        sd_dev = {k: v.detach().to(device) for k, v in net.state_dict().items()}
        del net
        _sync(device)
        stages["hessians"] = time.perf_counter() - t

        t = time.perf_counter()
        result = compress(sd_dev, args.output, budget=parse_size(args.budget), hessians=hessians,
                          model_config=config)
        _sync(device)
        stages["compress"] = time.perf_counter() - t
    except QpackError as exc:
        print(f"compress_device: error: {exc}", file=sys.stderr)
        return 2
    where = {k: str(v.device) for k, v in list(hessians.items())[:1]}
    report = {"device": str(device), "hessians_on": where, "bytes_total": result.bytes_total,
              "budget": result.budget, "params": result.params, "stages": stages,
              "compress_stages": result.stages}
    for name, sec in stages.items():
        print(f"stage {name:<10} {sec:8.2f} s")
    for name, sec in result.stages.items():
        print(f"  compress.{name:<12} {sec:8.2f} s")
    print(f"wrote {args.output}: {result.bytes_total:,} bytes <= {result.budget:,}; {result.params:,} params "
          f"on {device}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

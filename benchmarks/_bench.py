"""Shared pieces of the compression benchmarks: scoring an artifact, symbol entropy, plots, markdown tables."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qpack.artifact import read_artifact
from qpack.quant.base import Quantized


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
        counts = np.bincount((payload.q.astype(np.int16) + 128).ravel(), minlength=256)
        p = counts[counts > 0] / counts.sum()
        ent_bits += float(-(p * np.log2(p)).sum()) * payload.q.size
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

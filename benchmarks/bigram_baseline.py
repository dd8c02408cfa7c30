"""Val bits per byte of a bigram model fitted on the training tokens, beside a trained checkpoint's.

    python benchmarks/bigram_baseline.py --data data [--ckpt runs/cpu-small/final.pt]

The bigram model: counts of (previous, next) over every training shard with add-alpha smoothing (alpha = 0.1,
fixed, so nothing is tuned on val).
Bytes are counted with the same tokenizer rule as `qpack eval`.
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np


def bigram_bpb(data: str, alpha: float = 0.1) -> dict:
    """(val_loss, val_bpb) of an add-alpha bigram model fitted on `data`'s train split."""
    from qpack.data.shards import find_shards, read_shard
    from qpack.eval.run import load_val

    val = load_val(data)
    v = val.vocab_size
    counts = np.zeros((v, v), dtype=np.int64)
    for shard in find_shards(data, "train"):
        t = read_shard(shard, v).astype(np.int64)
        _count_fast(counts, t, v)
    probs = (counts + alpha) / (counts.sum(1, keepdims=True) + alpha * v)
    toks = val.tokens
    nll = -np.log(probs[toks[:-1], toks[1:]])
    loss = float(nll.mean())
    return {"val_loss": loss, "val_bpb": float(nll.sum() / math.log(2) / val.target_bytes.sum()),
            "tokens": int(nll.size), "bytes": int(val.target_bytes.sum())}


def _count_fast(counts: np.ndarray, t: np.ndarray, v: int) -> None:
    pair = t[:-1] * v + t[1:]
    counts += np.bincount(pair, minlength=v * v).reshape(v, v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data")
    ap.add_argument("--ckpt", default=None, help="also score this checkpoint (sliding window, whole val split)")
    args = ap.parse_args()
    out = {"bigram": bigram_bpb(args.data)}
    if args.ckpt:
        from qpack.eval.run import EvalOptions, evaluate

        r = evaluate(args.ckpt, args.data, options=EvalOptions(plain=False))
        out["model"] = {"val_loss": r["modes"]["sliding"]["val_loss"], "val_bpb": r["modes"]["sliding"]["val_bpb"],
                        "window": r["window"], "stride": r["stride"]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Val bits per byte of a bigram model fitted on the training tokens, beside a trained GPT's, on the same tokens.

    python benchmarks/train/bigram_baseline.py --data data --model runs/cpu-small/final.pt [--seq-len 512]

The bigram is P(t | p) = lam * count(p, t) / count(p) + (1 - lam) * P_unigram(t) (add-one unigram), with lam
chosen on the last 5% of the training tokens (never on val). Both models score the targets val[1 : n + 1],
n = the whole windows of seq_len in the first --val-tokens tokens, with the bytes qpack's tokenizer LUTs count.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from qpack.data.shards import load_split
from qpack.data.tokenizer import byte_counting, count_bytes, load_tokenizer


def bigram_tables(tokens: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(pair counts [V, V], add-one unigram probabilities [V]) of a token stream."""
    t = tokens.astype(np.int64)
    pairs = np.bincount(t[:-1] * vocab + t[1:], minlength=vocab * vocab).reshape(vocab, vocab).astype(np.float64)
    uni = np.bincount(t, minlength=vocab).astype(np.float64) + 1.0
    return pairs, uni / uni.sum()


def bigram_nll(pairs: np.ndarray, uni: np.ndarray, lam: float, prev: np.ndarray, nxt: np.ndarray) -> float:
    """Total NLL in nats of nxt given prev under the interpolated bigram."""
    rows = pairs.sum(axis=1)
    p_big = np.divide(pairs[prev, nxt], rows[prev], out=np.zeros(len(prev)), where=rows[prev] > 0)
    p = lam * p_big + (1.0 - lam) * uni[nxt]
    return float(-np.log(p).sum())


def fit_lambda(train: np.ndarray, vocab: int) -> float:
    """The interpolation weight that minimizes NLL on the last 5% of train, counts from the first 95%."""
    cut = int(len(train) * 0.95)
    pairs, uni = bigram_tables(train[:cut], vocab)
    held = train[cut:].astype(np.int64)
    grid = [0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99]
    return min(grid, key=lambda lam: bigram_nll(pairs, uni, lam, held[:-1], held[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="data folder (shards + tokenizer.model)")
    ap.add_argument("--model", help="a trainer final.pt to score on the same tokens")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--val-tokens", type=int, default=0, help="0 = the whole val split")
    args = ap.parse_args()

    data = Path(args.data)
    sp = load_tokenizer(data / "tokenizer.model")
    vocab = int(sp.get_piece_size())
    train = load_split(data, "train", vocab)
    val = load_split(data, "val", vocab).astype(np.int64)
    n_tok = len(val) - 1 if not args.val_tokens else min(len(val) - 1, args.val_tokens)
    n = n_tok // args.seq_len * args.seq_len
    prev, nxt = val[:n], val[1: n + 1]
    luts, space_rule = byte_counting(sp, vocab)
    nbytes = count_bytes(nxt, prev, luts, space_rule)

    lam = fit_lambda(train, vocab)
    pairs, uni = bigram_tables(train, vocab)
    nll = bigram_nll(pairs, uni, lam, prev, nxt)
    result = {"train_tokens": int(len(train)), "val_targets": int(n), "val_bytes": int(nbytes),
              "bigram": {"lambda": lam, "val_loss": nll / n, "val_bpb": nll / math.log(2) / nbytes}}

    if args.model:
        from qpack.models.gpt import build_from_config
        from trainers.gpt.train import TrainConfig, _nullcontext, evaluate, with_values

        ck = torch.load(args.model, map_location="cpu", weights_only=True)
        model = build_from_config(ck["config"])
        model.load_state_dict(ck["model"])
        cfg = with_values(TrainConfig(), {"seq_len": args.seq_len, "val_tokens": n_tok, "val_batch_size": 8})
        loss, bpb = evaluate(model, val, cfg, torch.device("cpu"), _nullcontext, (luts, space_rule), 0, 1)
        result["gpt"] = {"params": model.num_params(), "val_loss": loss, "val_bpb": bpb}

    print(json.dumps(result, indent=2, sort_keys=True))
    line = f"bigram val_bpb {result['bigram']['val_bpb']:.4f}"
    if "gpt" in result:
        line += f"   gpt val_bpb {result['gpt']['val_bpb']:.4f}"
    print(line)


if __name__ == "__main__":
    main()

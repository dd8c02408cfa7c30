"""Choose score-first TTT's defaults on a held-out slice of the TRAIN split, never on val tokens.

    python benchmarks/eval/tune_ttt.py --model records/cpu-smoke/train/final.pt --data data \
        --tokens 16384 --out benchmarks/eval/tune_ttt.txt

The slice is the same as tune_mixer.py's (the last --tokens tokens of the last train shard, which a run that saw
fewer tokens than the split holds never trained on). Each grid point runs TTT over the slice once; the val split
is then scored with the old and the chosen defaults, for the record only: it takes no part in the choice.
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import replace
from pathlib import Path

import torch
from tune_mixer import bpb_of, defaults_rank, held_out_train_slice, val_slice, write_report

from qpack.data.tokenizer import byte_counting, load_tokenizer
from qpack.eval.bpb import target_bytes
from qpack.eval.run import load_model
from qpack.eval.sliding import sliding_nll
from qpack.eval.ttt import TTTConfig, ttt_nll

LRS = [3e-4, 1e-3, 3e-3]
CHUNKS = [1024, 2048, 4096]
OPTIMIZERS = ["adamw", "sgd"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    window = loaded.train_seq_len or 256
    stride = window // 2
    sp = load_tokenizer(args.data / "tokenizer.model")
    vocab = int(loaded.config["vocab_size"])
    luts, space_counts = byte_counting(sp, vocab)
    lines = [f"$ python benchmarks/eval/tune_ttt.py --model {args.model} --data {args.data} "
             f"--tokens {args.tokens} --out {args.out}"]
    tune = held_out_train_slice(args.data, args.tokens)
    nbytes = target_bytes(tune, luts, space_counts)
    with torch.inference_mode():
        base = bpb_of(sliding_nll(loaded.model, tune, window, stride), nbytes)
    lines.append(f"window {window}, stride {stride}; sliding without TTT on the slice: {base:.4f} bpb")
    rows = []
    t0 = time.perf_counter()
    for lr, chunk, opt in itertools.product(LRS, CHUNKS, OPTIMIZERS):
        cfg = replace(TTTConfig(), lr=lr, chunk=chunk, optimizer=opt)
        rows.append((bpb_of(ttt_nll(loaded.model, tune, window, stride, cfg), nbytes), lr, chunk, opt))
    rows.sort(key=lambda r: r[0])
    lines.append(f"{len(rows)} grid points in {time.perf_counter() - t0:.0f}s; all, best first (train slice):")
    lines.append("bpb     lr      chunk  optimizer")
    lines += [f"{b:.4f}  {lr:<6}  {c:<5}  {o}" for b, lr, c, o in rows]
    old = TTTConfig()
    lines.append(defaults_rank(rows, (old.lr, old.chunk, old.optimizer),
                               f"lr {old.lr} chunk {old.chunk} {old.optimizer}"))
    _, lr, chunk, opt = rows[0]
    chosen = replace(old, lr=lr, chunk=chunk, optimizer=opt)
    val, vbytes = val_slice(args.data, args.tokens, luts, space_counts)
    lines.append(f"val (first {val.size - 1:,} tokens, for the record only): "
                 f"current defaults {bpb_of(ttt_nll(loaded.model, val, window, stride, old), vbytes):.4f}, "
                 f"chosen {bpb_of(ttt_nll(loaded.model, val, window, stride, chosen), vbytes):.4f}")
    lines.append(f"chosen: lr={lr} chunk={chunk} optimizer={opt}")
    write_report(lines, args.out)


if __name__ == "__main__":
    main()

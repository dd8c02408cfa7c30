"""Choose the Hedge mixer's defaults on a held-out slice of the TRAIN split, never on val tokens.

    python benchmarks/eval/tune_mixer.py --model /work/runs/cpu-smoke/final.pt --data /work/data \
        --tokens 65536 --out benchmarks/eval/tune_mixer.txt

The slice is the last --tokens tokens of the last train shard: the trainer reads the train shards in order from
the start, so a run that saw fewer tokens than the split holds never trained on them (the script checks the
checkpoint's recorded token count when it has one). The model's NLL is computed once with sliding windows; every
grid point only re-mixes it. The val split is then scored once with the old and the chosen defaults, for the
record only: it takes no part in the choice.
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from qpack.data.shards import find_shards, load_split, read_shard
from qpack.data.tokenizer import byte_counting, load_tokenizer
from qpack.eval.bpb import score, target_bytes
from qpack.eval.mixer import MixerConfig, mix_nll
from qpack.eval.run import load_model
from qpack.eval.sliding import sliding_nll

ORDERS = [(1, 2, 3), (1, 2, 3, 4), (1, 2, 3, 4, 5), (1, 2, 3, 4, 5, 6), (2, 3, 4, 5, 6)]
ETAS = [0.25, 0.5, 1.0, 2.0]
DECAYS = [0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]


def held_out_train_slice(data: Path, n: int) -> np.ndarray:
    """The last n + 1 tokens of the last train shard."""
    last = find_shards(data, "train")[-1]
    tokens = read_shard(last).astype(np.int64)
    if tokens.size < n + 1:
        raise SystemExit(f"{last} holds {tokens.size} tokens, fewer than --tokens {n} + 1")
    return tokens[-(n + 1):]


def bpb_of(nll: np.ndarray, nbytes: np.ndarray) -> float:
    return score(nll, nbytes).val_bpb


def val_slice(data: Path, n: int, luts, space_counts) -> tuple[np.ndarray, np.ndarray]:
    """The first n + 1 val tokens and their targets' bytes: scored for the record only, never to choose."""
    val = load_split(data, "val").astype(np.int64)[: n + 1]
    return val, target_bytes(val, luts, space_counts)


def defaults_rank(rows: list[tuple], current: tuple, label: str) -> str:
    """The log line for the current defaults: their bpb in the grid `rows` ((bpb, *setting), best first) and rank."""
    row = next(r for r in rows if tuple(r[1:]) == current)
    return f"current defaults {label}: {row[0]:.4f} (rank {rows.index(row) + 1} of {len(rows)})"


def write_report(lines: list[str], out: Path) -> None:
    """Write the tuning log to `out` and print it."""
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    print(text, end="")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--window", type=int, default=None, help="default: the model's training sequence length")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    window = args.window or loaded.train_seq_len or 256
    stride = window // 2
    sp = load_tokenizer(args.data / "tokenizer.model")
    vocab = int(loaded.config["vocab_size"])
    luts, space_counts = byte_counting(sp, vocab)
    lines = [f"$ python benchmarks/eval/tune_mixer.py --model {args.model} --data {args.data} "
             f"--tokens {args.tokens} --out {args.out}"]
    seen = loaded.extra.get("tokens_seen") if isinstance(loaded.extra, dict) else None
    train_total = sum(read_shard(p).size for p in find_shards(args.data, "train"))
    lines.append(f"train split {train_total:,} tokens; tuning slice = its last {args.tokens:,} tokens"
                 + (f"; the checkpoint trained on the first {seen:,}" if isinstance(seen, int) else ""))

    def model_nll(tokens: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return sliding_nll(loaded.model, tokens, window, stride)

    t0 = time.perf_counter()
    tune = held_out_train_slice(args.data, args.tokens)
    nll = model_nll(tune)
    nbytes = target_bytes(tune, luts, space_counts)
    lines.append(f"window {window}, stride {stride}; model alone on the slice: {bpb_of(nll, nbytes):.4f} bpb "
                 f"({time.perf_counter() - t0:.1f}s)")
    rows = []
    for orders, eta, decay in itertools.product(ORDERS, ETAS, DECAYS):
        cfg = MixerConfig(orders=orders, eta=eta, decay=decay)
        rows.append((bpb_of(mix_nll(nll, tune, vocab, cfg).nll, nbytes), orders, eta, decay))
    rows.sort(key=lambda r: r[0])
    lines.append(f"{len(rows)} grid points; best 10 on the train slice:")
    lines.append("bpb     orders             eta   decay")
    lines += [f"{b:.4f}  {str(o):<17}  {e:<4}  {d}" for b, o, e, d in rows[:10]]
    old = MixerConfig()
    lines.append(defaults_rank(rows, (old.orders, old.eta, old.decay), f"{old.orders} eta {old.eta} decay {old.decay}"))
    _, orders, eta, decay = rows[0]
    chosen = MixerConfig(orders=orders, eta=eta, decay=decay)

    val, vbytes = val_slice(args.data, args.tokens, luts, space_counts)
    vnll = model_nll(val)
    lines.append(f"val (first {val.size - 1:,} tokens, for the record only): model {bpb_of(vnll, vbytes):.4f}, "
                 f"current defaults {bpb_of(mix_nll(vnll, val, vocab, old).nll, vbytes):.4f}, "
                 f"chosen {bpb_of(mix_nll(vnll, val, vocab, chosen).nll, vbytes):.4f}")
    lines.append(f"chosen: orders={orders} eta={eta} decay={decay}")
    write_report(lines, args.out)


if __name__ == "__main__":
    main()

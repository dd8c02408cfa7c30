"""Cross-row context on real quantized weights: the records' per-group coder against order-0 ANS and its floor.

The 2026-04-27 record stores its int6 GPTQ codes per role group (every layer's q projection in one blob, ...),
sorts the rows of the embedding, q and MLP-up groups by a greedy L1 nearest-neighbour chain (permutation
stored as uint16, brotli-11), transposes each matrix so that a row's neighbour in the chain is the previous
byte, and compresses each blob with `lrzip -z -L 9` (ZPAQ context mixing). This benchmark quantizes a
checkpoint with `qpack compress --bits B --codec raw`, takes every codes section (one symbol per byte, as an
artifact stores it) and prices the same codes every way; all figures are bytes summed over sections:

  H0          order-0 empirical entropy of each tensor, no table (the floor of any order-0 coder)
  ans         qpack's `ans` codec per tensor (order-0, exact table in the frame)
  ans_ctx     qpack's `ans_ctx` codec per tensor (near-copy rows coded as differences)
  ans_cols    qpack's `ans_cols` codec per tensor (one table per class of columns; width = the columns)
  qpack       the smallest of ans, ans_ctx and ans_cols per tensor (what compress stores with all three listed)
  brotli-11   brotli per tensor (the records' earlier pipelines, without their byte shuffle)
  lrzip       the groups, as they are (row-major), through lrzip -z -L 9
  records     the records' per-group coder: the groups sorted and transposed as above, lrzip -z -L 9, plus the
              permutations (uint16, brotli-11)
  records -T  the same with lrzip's LZ4 compressibility test off (-T): as run, lrzip stores a chunk that LZ4
              cannot shrink without compressing it, which one-symbol-per-byte int6 codes often are
  H|above     conditional entropy of each symbol given the symbol above it in the sorted order, one table per
              (group, symbol above) priced as `ans` stores a table: the floor of a coder with that context
  H|above+left  the same given (symbol above, |left - mode| in 0, 1, 2, >2)

    python benchmarks/codecs/rows.py runs/cpu-smoke/final.pt --bits 4,6 --out benchmarks/codecs/rows.md

Each width gets two rows: every codes section, and the block matrices alone (the embedding left out: its
near-copy rows are the structure `ans_ctx` already codes). Needs the `lrzip` program (Debian: apt-get install lrzip); qpack itself never calls it.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

import brotli
import numpy as np

from ans_ctx import entropy_bytes, raw_codes_artifact, table_bytes  # benchmarks/codecs/ans_ctx.py, beside this
from qpack.artifact import read_artifact
from qpack.codecs import make_codec
from qpack.quant.base import Quantized

_HOT = re.compile(r"(embed|tok_emb|wte|\.q\b|c_q|q_proj|attn_q|fc\b|c_fc|up|gate)")


def conditional_bytes(x: np.ndarray, ctx: np.ndarray) -> float:
    """Entropy of `x` given `ctx` plus one table per context value."""
    order = np.argsort(ctx, kind="stable")
    xs, cs = x[order], ctx[order]
    cuts = np.flatnonzero(np.diff(cs)) + 1
    return sum(entropy_bytes(part) + table_bytes(part) for part in np.split(xs, cuts))


def l1_chain(m: np.ndarray) -> np.ndarray:
    """Greedy nearest-neighbour chain from row 0 under the L1 distance: each next row is the closest unused one."""
    x = m.astype(np.float32)
    n = x.shape[0]
    left = np.ones(n, dtype=bool)
    left[0] = False
    order = [0]
    for _ in range(n - 1):
        idx = np.flatnonzero(left)
        d = np.abs(x[idx] - x[order[-1]]).sum(axis=1)
        nxt = int(idx[int(np.argmin(d))])
        left[nxt] = False
        order.append(nxt)
    return np.asarray(order, dtype=np.int64)


def lrzip_bytes(blob: bytes, tmp: Path, test: bool = True) -> int:
    """Bytes of `blob` through lrzip's ZPAQ back end at level 9 (checked to decompress to `blob`)."""
    src = tmp / "g.bin"
    src.write_bytes(blob)
    out = tmp / "g.bin.lrz"
    subprocess.run(["lrzip", "-q", "-f", "-z", "-L", "9", *([] if test else ["-T"]), "-o", str(out), str(src)],
                   check=True, capture_output=True)
    n = out.stat().st_size
    back = tmp / "back.bin"
    subprocess.run(["lrzip", "-q", "-f", "-d", "-o", str(back), str(out)], check=True, capture_output=True)
    assert back.read_bytes() == blob
    return n


def role(name: str) -> str:
    """The name with its layer index taken out: tensors of one role across layers share a group."""
    return re.sub(r"\.\d+\.", ".*.", name)


def is_embedding(name: str) -> bool:
    return bool(re.search(r"(embed|tok_emb|wte|token_embd)", name))


def measure(path: Path, tmp: Path) -> dict[str, dict[str, float]]:
    """{"all": sums, "blocks": sums over the non-embedding sections} (see the module docstring)."""
    art = read_artifact(path)
    ans, ctx = make_codec("ans"), make_codec("ans_ctx")
    parts: dict[str, dict[str, float]] = {"all": defaultdict(float), "blocks": defaultdict(float)}
    groups: dict[str, list[np.ndarray]] = defaultdict(list)
    for name in art.names():
        qz = art.quantized(name)
        if not isinstance(qz, Quantized):
            continue
        m = (1 << (qz.bits - 1)) - 1
        grid = (qz.q.numpy().astype(np.int16) + m).astype(np.uint8)
        raw = grid.tobytes()
        cols = make_codec("ans_cols", {"width": grid.shape[1]})
        a, c, k = ans.encode(raw), ctx.encode(raw), cols.encode(raw)
        assert ans.decode(a, len(raw)) == raw and ctx.decode(c, len(raw)) == raw and cols.decode(k, len(raw)) == raw
        figures = {"symbols": grid.size, "H0": entropy_bytes(grid.reshape(-1)), "ans": len(a), "ans_ctx": len(c),
                   "ans_cols": len(k), "qpack": min(len(a), len(c), len(k)),
                   "brotli-11": len(brotli.compress(raw, quality=11))}
        _add(parts, is_embedding(name), figures)
        groups[role(name)].append(grid)
    for key, mats in groups.items():
        sums: dict[str, float] = defaultdict(float)
        sums["lrzip"] = lrzip_bytes(b"".join(g.tobytes() for g in mats), tmp)
        chains = [l1_chain(g) if g.shape[0] > 1 else np.arange(g.shape[0]) for g in mats]
        hot = bool(_HOT.search(key))  # the records sort only these groups; the context floors below sort all
        perms = b"".join(o.astype(np.uint16).tobytes() for o, g in zip(chains, mats) if hot and g.shape[0] > 1)
        blob = b"".join(np.ascontiguousarray((g[o] if hot else g).T).tobytes() for o, g in zip(chains, mats))
        perm_bytes = len(brotli.compress(perms, quality=11)) if perms else 0
        sums["records"] = lrzip_bytes(blob, tmp) + perm_bytes
        sums["records -T"] = lrzip_bytes(blob, tmp, test=False) + perm_bytes
        xs, above, left = [], [], []
        for o, g in zip(chains, mats):
            g = g[o]
            mode = int(np.argmax(np.bincount(g.reshape(-1), minlength=256)))
            up = np.vstack([np.full((1, g.shape[1]), mode, np.uint8), g[:-1]])
            lf = np.hstack([np.full((g.shape[0], 1), mode, np.uint8), g[:, :-1]])
            xs.append(g.reshape(-1))
            above.append(up.reshape(-1).astype(np.int64))
            left.append(np.minimum(np.abs(lf.reshape(-1).astype(np.int64) - mode), 3))
        x, up, lf = np.concatenate(xs), np.concatenate(above), np.concatenate(left)
        sums["H|above"] = conditional_bytes(x, up)
        sums["H|above+left"] = conditional_bytes(x, up * 4 + lf)
        _add(parts, is_embedding(key), sums)
    return parts


def _add(parts: dict[str, dict[str, float]], embedding: bool, figures: dict[str, float]) -> None:
    """Add `figures` to the "all" sums, and to the "blocks" sums unless they are the embedding's."""
    for tot in [parts["all"]] + ([] if embedding else [parts["blocks"]]):
        for k, v in figures.items():
            tot[k] += v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--bits", default="4,6")
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args()
    cols = ["H0", "ans", "ans_ctx", "ans_cols", "qpack", "brotli-11", "lrzip", "records", "records -T", "H|above", "H|above+left"]
    lines = [f"checkpoint `{args.ckpt}`; bytes summed over codes sections; % against ans", "",
             "| bits | sections | symbols | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for b in [int(v) for v in args.bits.split(",")]:
            path = raw_codes_artifact(args.ckpt, b, tmp)
            for part, t in measure(path, tmp).items():
                cells = [f"{t[c]:,.0f} ({t[c] / t['ans'] - 1:+.2%})" for c in cols]
                lines.append(f"| {b} | {part} | {t['symbols']:,.0f} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

"""The codec benchmark behind `qpack bench-codecs`: quantized symbols -> every codec, level and layout.

For each bit width the weights are quantized per row (rtn), laid out as one symbol per byte or packed
densely, and fed to each codec setting. A row records the encoded bytes, bits per weight, the excess over
the empirical order-0 entropy of the codes, and compress / decompress speed in MB/s of the codec's input
(the laid-out stream). Every row is decoded and compared with its input.

Settings that compress at about 1 MB/s or less ("slow") run on a subset of rows spread evenly over the
sample (at most `slow_limit` weights) so the default run stays short; such rows say how many weights they
saw and their excess is measured against the entropy of that subset.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .codecs import Codec, codec_names, make_codec
from .errors import QpackFormatError, QpackInputError, Reason
from .filekind import is_artifact
from .pack import encode_codes

DEFAULT_BITS = (4, 5, 6, 8)
DEFAULT_SLOW_LIMIT = 1 << 19

# (codec, params, layouts, slow). Levels are swept because zstd's are not monotone on quantized codes.
SWEEP: list[tuple[str, dict[str, Any], tuple[str, ...], bool]] = [
    ("raw", {}, ("byte", "packed"), False),
    ("zlib", {"level": 9}, ("byte", "packed"), False),
    ("zstd", {"level": 1}, ("byte", "packed"), False),
    ("zstd", {"level": 3}, ("byte",), False),
    ("zstd", {"level": 9}, ("byte",), False),
    ("zstd", {"level": 19}, ("byte",), True),
    ("zstd", {"level": 22}, ("byte", "packed"), True),
    ("lzma", {"preset": 6}, ("byte",), True),
    ("lzma", {"preset": 9, "extreme": True}, ("byte", "packed"), True),
    ("brotli", {"quality": 9}, ("byte",), False),
    ("brotli", {"quality": 11}, ("byte", "packed"), True),
    ("ans", {}, ("byte",), False),
    ("ans", {"group": 65536}, ("byte",), False),
    ("ans_cols", {"width": 512}, ("byte",), False),  # the streams are rows of 512 codes (run_bench's row_len)
]


@dataclass
class Setting:
    """One codec configuration to run on one layout."""

    codec: Codec
    layout: str
    slow: bool = False


@dataclass
class Row:
    """One measured (bit width, codec setting, layout)."""

    codec: str
    params: dict[str, Any]
    layout: str
    bits: int
    weights: int
    bytes: int
    bits_per_weight: float
    excess_over_entropy: float
    compress_mb_s: float
    decompress_mb_s: float
    roundtrip: bool


@dataclass
class BenchResult:
    """Entropy per bit width (over the whole sample) and the measured rows."""

    entropy_bits_per_weight: dict[int, float]
    weights: dict[int, int]
    rows: list[Row] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The `--json` object: entropy per bit width (string keys) and one dict per row."""
        return {
            "entropy_bits_per_weight": {str(b): h for b, h in sorted(self.entropy_bits_per_weight.items())},
            "rows": [asdict(r) for r in self.rows],
        }


# --------------------------------------------------------------------------------------------- inputs

def gpt_matrix_shapes(width: int = 512, vocab: int = 1024, kv_ratio: int = 2, mlp_mult: int = 2) -> list[tuple[str, int, int]]:
    """(name, rows, cols) of one transformer block of a `width`-wide GPT plus its tied embedding."""
    kv = width // kv_ratio
    return [
        ("attn.q", width, width), ("attn.k", kv, width), ("attn.v", kv, width), ("attn.proj", width, width),
        ("mlp.fc", mlp_mult * width, width), ("mlp.proj", width, mlp_mult * width), ("tok_emb", vocab, width),
    ]


def synthetic_sample(full: bool = False, max_weights: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic GPT-like weights: Gaussian attention rows, Student-t (heavy-tailed) MLP rows.

    Default: one 512-wide block plus half the embedding (2,097,152 weights); `full`: 9 blocks plus the
    embedding (about 17M, the parameter-golf baseline's shape). `max_weights` truncates (tests).
    """
    shapes = []
    blocks = 9 if full else 1
    for layer in range(blocks):
        shapes += [(f"blocks.{layer}.{n}", r, c) for n, r, c in gpt_matrix_shapes() if n != "tok_emb"]
    emb_rows = 1024 if full else 512
    shapes.append(("tok_emb", emb_rows, 512))
    out: dict[str, torch.Tensor] = {}
    left = max_weights if max_weights is not None else sum(r * c for _, r, c in shapes)
    for i, (name, rows, cols) in enumerate(shapes):
        keep = min(rows, left // cols) or (1 if not out else 0)
        if keep == 0:
            break
        left -= keep * cols
        # One generator per matrix, full draws then a slice: a truncated sample is a prefix of the full one.
        rng = np.random.default_rng([seed, i])
        # Row scales vary as in trained nets (lognormal); MLP rows are heavy-tailed (t with 4-8 dof).
        row_std = np.exp(rng.normal(0.0, 0.25, size=(rows, 1))) / math.sqrt(cols)
        if ".mlp." in name:
            dof = rng.uniform(4.0, 8.0, size=(rows, 1))
            w = rng.standard_t(dof, size=(rows, cols)) * np.sqrt((dof - 2) / dof)
        else:
            w = rng.standard_normal((rows, cols))
        w = (w * row_std)[:keep]
        out[name] = torch.from_numpy(w.astype(np.float32))
    return out


def quantize_weights(weights: dict[str, torch.Tensor], bits: int) -> np.ndarray:
    """All matrices quantized per row with rtn at `bits`, codes concatenated row-major (int8)."""
    from .quant import make_quantizer

    quantizer = make_quantizer("rtn", bits)
    parts = [quantizer.quantize(w).q.cpu().numpy() for w in weights.values()]
    return np.concatenate([p.reshape(-1) for p in parts]) if parts else np.zeros(0, dtype=np.int8)


def load_input(path: str | Path) -> tuple[dict[str, torch.Tensor] | None, dict[int, np.ndarray] | None]:
    """Read INPUT: a checkpoint gives float matrices to quantize; a .qpk artifact gives its codes by bit width.

    The kind is told by content (the artifact magic), not by the file name.
    """
    p = Path(path)
    if not p.is_file():
        raise QpackFormatError(p, Reason.IO, "no such file (bench-codecs takes a checkpoint, .safetensors or .qpk file)")
    if is_artifact(p, "a checkpoint or artifact"):
        from .artifact import read_artifact

        art = read_artifact(p)
        codes: dict[int, list[np.ndarray]] = {}
        for name in art.names():
            q = art.quantized(name)
            if isinstance(q, torch.Tensor):
                continue  # passthrough tensors carry no codes
            codes.setdefault(q.bits, []).append(q.q.numpy().reshape(-1))
        if not codes:
            raise QpackFormatError(p, Reason.NOT_A_MODEL, "artifact holds no quantized tensors to benchmark")
        return None, {b: np.concatenate(v) for b, v in codes.items()}
    from .checkpoint import load_state_dict

    state, _config, _extra = load_state_dict(p)
    mats = {k: v for k, v in state.items() if v.is_floating_point() and v.ndim >= 2 and v.numel() > 0}
    if not mats:
        raise QpackFormatError(p, Reason.NOT_A_MODEL, "checkpoint holds no floating-point matrices to quantize")
    return {k: mats[k] for k in sorted(mats)}, None


# ------------------------------------------------------------------------------------------- settings

def parse_bits(text: str | Iterable[int]) -> list[int]:
    """"4,5,6,8" -> [4, 5, 6, 8]; each width must be in 2..8 (rtn's symmetric codes need 2 bits or more)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        try:
            b = int(str(item).strip())
        except ValueError:
            raise QpackInputError(f"--bits: {str(item).strip()!r} is not an integer (write e.g. 4,5,6,8)") from None
        if not 2 <= b <= 8:
            raise QpackInputError(f"--bits: {b} is outside 2..8 (symmetric codes need at least 2 bits)")
        if b not in out:
            out.append(b)
    if not out:
        raise QpackInputError("--bits: give at least one bit width, e.g. 4,5,6,8")
    return sorted(out)


def default_settings(codecs: Iterable[str] | None = None) -> list[Setting]:
    """The level/layout sweep for the chosen codec names (all registered, plugins included, by default).

    A codec without an entry in SWEEP (a plugin) runs once with its default parameters on the byte layout.
    """
    known = codec_names()
    if codecs is None:  # the sweep's order first, then plugins by name
        swept = list(dict.fromkeys(s[0] for s in SWEEP))
        names = [n for n in swept if n in known] + [n for n in known if n not in swept]
    else:
        names = list(codecs)
    for n in names:
        if n not in known:
            raise QpackInputError(f"--codecs: unknown codec {n!r}; known: {', '.join(known)}")
    settings = []
    for n in dict.fromkeys(names):
        sweep = [s for s in SWEEP if s[0] == n]
        if not sweep:
            settings.append(Setting(make_codec(n), "byte"))
        for name, params, layouts, slow in sweep:
            settings += [Setting(make_codec(name, params), layout, slow) for layout in layouts]
    return settings


def parse_codecs(text: str | None) -> list[str] | None:
    """"zstd,ans" -> ["zstd", "ans"]; None means every registered codec."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise QpackInputError("--codecs: give at least one codec name, e.g. zstd,ans")
    return names


# ------------------------------------------------------------------------------------------- measuring

def entropy_bits(codes: np.ndarray) -> float:
    """Empirical order-0 entropy of the codes, in bits per code."""
    if codes.size == 0:
        return 0.0
    counts = np.bincount(codes.astype(np.int64) - int(codes.min()))
    p = counts[counts > 0] / codes.size
    return float(-(p * np.log2(p)).sum())


def _timed(fn: Callable[[], Any], min_seconds: float, max_reps: int) -> tuple[Any, float]:
    """Run fn at least once, repeating (up to max_reps) while under min_seconds; the fastest run's time."""
    best, total, reps, result = math.inf, 0.0, 0, None
    while reps < max_reps and (reps == 0 or total < min_seconds):
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        best, total, reps = min(best, dt), total + dt, reps + 1
    return result, max(best, 1e-9)


def _subset_rows(codes: np.ndarray, row_len: int, limit: int | None) -> np.ndarray:
    """Every k-th row of `row_len` codes so that at most `limit` codes remain (the whole stream if it fits)."""
    if limit is None or codes.size <= limit:
        return codes
    rows = codes.size // row_len
    step = math.ceil(codes.size / limit)
    picked = codes[: rows * row_len].reshape(rows, row_len)[::step]
    return picked.reshape(-1)


def measure(codes: np.ndarray, bits: int, setting: Setting, min_seconds: float = 0.05) -> Row:
    """Encode, time and verify one setting on one code stream."""
    data = encode_codes(codes, bits, setting.layout)
    codec = setting.codec
    frame, t_enc = _timed(lambda: codec.encode(data), min_seconds, 3)
    back, t_dec = _timed(lambda: codec.decode(frame, len(data)), min_seconds, 10)
    n = codes.size
    h = entropy_bits(codes)
    bpw = 8 * len(frame) / n if n else 0.0
    return Row(
        codec=codec.name,
        params=dict(sorted(codec.params.items())),
        layout=setting.layout,
        bits=bits,
        weights=int(n),
        bytes=len(frame),
        bits_per_weight=bpw,
        excess_over_entropy=(bpw / h - 1.0) if h > 0 else math.inf,
        compress_mb_s=len(data) / t_enc / 1e6,
        decompress_mb_s=len(data) / t_dec / 1e6,
        roundtrip=back == data,
    )


def run_bench(
    codes_by_bits: dict[int, np.ndarray],
    settings: list[Setting],
    slow_limit: int | None = DEFAULT_SLOW_LIMIT,
    row_len: int = 512,
    progress: Callable[[str], None] | None = None,
    min_seconds: float = 0.2,
) -> BenchResult:
    """Measure every setting on every bit width's codes; slow settings see at most `slow_limit` codes.

    Fast runs repeat until `min_seconds` and keep the best time, which damps noise from a busy machine.
    """
    result = BenchResult(
        entropy_bits_per_weight={b: entropy_bits(c) for b, c in sorted(codes_by_bits.items())},
        weights={b: int(c.size) for b, c in sorted(codes_by_bits.items())},
    )
    for bits, codes in sorted(codes_by_bits.items()):
        subset = _subset_rows(codes, row_len, slow_limit)
        for s in settings:
            result.rows.append(measure(subset if s.slow else codes, bits, s, min_seconds))
            if progress:
                progress(f"int{bits} {s.codec.label()} {s.layout}")
    return result


def bench_codes_from_weights(weights: dict[str, torch.Tensor], bits: list[int]) -> dict[int, np.ndarray]:
    """Quantize the weights at each width."""
    return {b: quantize_weights(weights, b) for b in bits}


# --------------------------------------------------------------------------------------------- output

def format_params(codec: str, params: dict[str, Any]) -> str:
    """Compact params for the table: the codec's first (main) parameter, plus any that differ from its defaults."""
    from .codecs import CODECS

    defaults = CODECS.get(codec).defaults if codec in CODECS else {}
    main = next(iter(defaults), None)
    shown = {k: v for k, v in params.items() if k == main or defaults.get(k, object()) != v}
    return ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in shown.items()) or "-"


def _speed(mb_s: float) -> str:
    # raw runs at memcpy speed; more digits there would only be noise.
    return f"{mb_s:.2f}" if mb_s < 1000 else f"{mb_s:.0f}" if mb_s < 100_000 else ">100000"


def format_table(result: BenchResult) -> str:
    """The human table: an entropy line per bit width, then one line per row."""
    lines = []
    for b, h in sorted(result.entropy_bits_per_weight.items()):
        lines.append(f"int{b}: empirical order-0 entropy {h:.4f} bits/weight over {result.weights[b]:,} weights")
    head = f"{'bits':>4}  {'codec':<7} {'params':<22} {'layout':<6} {'bytes':>11} {'bits/w':>7} {'excess':>8} " \
           f"{'comp MB/s':>9} {'dec MB/s':>9}  note"
    lines += ["", head, "-" * len(head)]
    for r in result.rows:
        notes = []
        if r.weights != result.weights[r.bits]:
            notes.append(f"subset {r.weights:,} w")
        if not r.roundtrip:
            notes.append("ROUND TRIP FAILED")
        lines.append(
            f"{r.bits:>4}  {r.codec:<7} {format_params(r.codec, r.params):<22} {r.layout:<6} {r.bytes:>11,} "
            f"{r.bits_per_weight:>7.4f} {100 * r.excess_over_entropy:>+7.2f}% {_speed(r.compress_mb_s):>9} "
            f"{_speed(r.decompress_mb_s):>9}  {'; '.join(notes)}".rstrip()
        )
    return "\n".join(lines)


def plot(result: BenchResult, path: str | Path) -> None:
    """Bits per weight against decode speed, one panel per bit width; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted(result.entropy_bits_per_weight)
    ncols = min(2, len(widths))
    nrows = -(-len(widths) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 5 * nrows), squeeze=False)
    names = list(dict.fromkeys(r.codec for r in result.rows))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    for ax in axes.reshape(-1)[len(widths):]:
        ax.set_visible(False)
    for ax, b in zip(axes.reshape(-1), widths):
        # raw sits at 8 (or `bits`) bits per weight and memcpy speed: it would squash every other point.
        for r in (r for r in result.rows if r.bits == b and r.codec != "raw"):
            marker = "o" if r.layout == "byte" else "s"
            ax.scatter(r.decompress_mb_s, r.bits_per_weight, color=colors[r.codec], marker=marker,
                       label=f"{r.codec} ({r.layout})")
            ax.annotate(format_params(r.codec, r.params).replace("-", ""), (r.decompress_mb_s, r.bits_per_weight),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.axhline(result.entropy_bits_per_weight[b], color="gray", ls="--", lw=1, label="order-0 entropy")
        ax.set_xscale("log")
        ax.set_title(f"int{b} (raw omitted; circles: byte layout, squares: packed)", fontsize=9)
        ax.set_xlabel("decompress MB/s (log)")
        ax.set_ylabel("bits per weight")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=6, loc="best", framealpha=0.6)
    fig.tight_layout()
    from .fsio import atomic_write_with

    try:
        atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)

"""The record pipeline: data -> train -> compress to the budget -> evaluate -> a record folder.

The folder looks like a parameter-golf record: README.md with the numbers, submission.json, the train and
eval logs, the artifact, and PNG plots of the training curve and of the per-tensor bit allocation. The code
counted against the budget is the trainer's own source (the files a submission would ship), compressed with
`code_codec` as it would be shipped.
"""
from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import qpack
from qpack.compress import CompressConfig, code_size, compress
from qpack.errors import QpackInputError

CODE_DIR = Path(__file__).resolve().parent / "gpt"


@dataclass(frozen=True)
class RecordConfig:
    """One record run; every field has a CLI flag of the same name."""

    preset: str = "cpu-smoke"  # trainer preset (trainers/gpt/presets.py)
    budget: int = 16_000_000  # bytes for artifact + code
    out: str = "records/cpu-smoke"  # the record folder (created; an existing one is replaced only when complete)
    data: str = "data"  # data folder; built from Debian doc packages when missing
    seed: int = 1337  # training seed
    overrides: tuple[str, ...] = ()  # trainer --key=value overrides
    scheme: str = "auto"  # compress scheme: auto = GPTQ with calibration from the train split
    calib_tokens: int = 16384  # calibration tokens for GPTQ
    codecs: tuple[str, ...] = ("ans", "zstd")  # codecs compress tries per tensor
    code_codec: str = "lzma"  # how the shipped code is counted (compressed with this codec)
    window: int | None = None  # eval window (default: the model's sequence length)
    stride: int | None = None  # eval stride (default: window // 2)
    eval_tokens: int | None = None  # score only the first N val tokens (None: the whole val split)
    mixer: bool = False  # also score with the Hedge n-gram mixer
    ttt: bool = False  # also score with score-first TTT
    progress: bool = True  # progress bars on stderr

    def __post_init__(self) -> None:
        if self.budget <= 0:
            raise QpackInputError(f"budget must be positive, got {self.budget}")
        if self.eval_tokens is not None and self.eval_tokens < 2:
            raise QpackInputError("eval_tokens must be at least 2")


def code_files() -> list[Path]:
    """The trainer's source files: what a submission ships beside the artifact."""
    return sorted(p for p in CODE_DIR.glob("*.py"))


def _log_to(path: Path) -> Callable[[str], None]:
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(msg + "\n")

    return log


def run_record(cfg: RecordConfig) -> dict[str, Any]:
    """Run the whole pipeline and write the record folder; returns submission.json's content."""
    from qpack.calibrate import build_model, collect, load_calibration_tokens
    from qpack.checkpoint import load_state_dict
    from qpack.data.build import ensure_data
    from qpack.eval.mixer import MixerConfig
    from qpack.eval.run import EvalOptions, evaluate
    from qpack.eval.ttt import TTTConfig

    from .gpt.train import config_from_args, read_metrics, train

    out = Path(cfg.out)
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = _log_to(work / "record.log")
    t_all = time.perf_counter()
    log(f"qpack record: preset {cfg.preset}, budget {cfg.budget:,} bytes, out {out}")

    # 1. data
    t0 = time.perf_counter()
    paths = ensure_data(cfg.data, progress=cfg.progress, log=log)
    data_seconds = time.perf_counter() - t0

    # 2. train
    run_dir = work / "train"
    tcfg = config_from_args(cfg.preset, str(paths.root), str(run_dir), [f"--seed={cfg.seed}", *cfg.overrides])
    t0 = time.perf_counter()
    summary = train(tcfg, log=log)
    train_seconds = time.perf_counter() - t0
    final = run_dir / "final.pt"

    # 3. compress to the budget, the trainer's code counted as it ships
    t0 = time.perf_counter()
    code_bytes = code_size(code_files(), cfg.code_codec)
    sd, model_config, extra = load_state_dict(final)
    hessians = None
    if cfg.scheme in ("auto", "gptq", "search"):
        tokens = load_calibration_tokens(paths.root, cfg.calib_tokens, vocab_size=model_config.get("vocab_size"))
        net = build_model(sd, model_config, None)
        seq = int(model_config.get("max_seq_len") or model_config.get("seq_len") or tcfg.seq_len)
        hessians = collect(net, tokens, min(seq, tcfg.seq_len), progress=False)
        del net
    artifact = work / "model.qpk"
    ccfg = CompressConfig(budget=cfg.budget, scheme=cfg.scheme, codecs=cfg.codecs, code_bytes=code_bytes)
    result = compress(final, artifact, ccfg, hessians=hessians)
    compress_seconds = time.perf_counter() - t0
    (work / "compress.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    log(f"compress: {result.bytes_total:,} bytes total ({result.bytes_model:,} model + {code_bytes:,} code) "
        f"<= {cfg.budget:,}; {result.bits_per_param:.3f} bits/param in {compress_seconds:.1f}s")

    # 4. evaluate the artifact (and the unquantized checkpoint, for the quantization gap)
    options = EvalOptions(window=cfg.window, stride=cfg.stride, max_tokens=cfg.eval_tokens,
                          mixer=MixerConfig() if cfg.mixer else None, ttt=TTTConfig() if cfg.ttt else None)
    t0 = time.perf_counter()
    ev = evaluate(artifact, paths.root, options=options)
    eval_seconds = time.perf_counter() - t0
    base_options = EvalOptions(window=cfg.window, stride=cfg.stride, max_tokens=cfg.eval_tokens)
    ev_fp = evaluate(final, paths.root, options=base_options)
    (work / "eval.json").write_text(json.dumps({"artifact": ev, "unquantized": ev_fp}, indent=2) + "\n")
    for name, m in ev["modes"].items():
        log(f"eval {name}: val_loss {m['val_loss']:.4f} val_bpb {m['val_bpb']:.4f} ({m.get('seconds', 0):.1f}s)")
    log(f"eval unquantized sliding: val_bpb {ev_fp['modes']['sliding']['val_bpb']:.4f}")

    sliding = ev["modes"]["sliding"]
    submission = {
        "val_bpb": sliding["val_bpb"],
        "val_loss": sliding["val_loss"],
        "val_bpb_unquantized": ev_fp["modes"]["sliding"]["val_bpb"],
        "quant_gap_bpb": sliding["val_bpb"] - ev_fp["modes"]["sliding"]["val_bpb"],
        "modes": {k: {"val_bpb": v["val_bpb"], "val_loss": v["val_loss"]} for k, v in ev["modes"].items()},
        "bytes_total": result.bytes_total,
        "bytes_model": result.bytes_model,
        "bytes_code": code_bytes,
        "budget": cfg.budget,
        "params": result.params,
        "bits_per_param": result.bits_per_param,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "train_seconds": train_seconds,
        "compress_seconds": compress_seconds,
        "eval_seconds": eval_seconds,
        "data_seconds": data_seconds,
        "train_steps": summary.get("steps"),
        "train_tokens": summary.get("tokens"),
        "eval_tokens": sliding.get("tokens"),
        "eval_bytes": sliding.get("bytes"),
        "eval_window": ev.get("window"),
        "eval_stride": ev.get("stride"),
        "eval_max_tokens": cfg.eval_tokens,
        "qpack_version": qpack.__version__,
        "data_manifest_hash": paths.manifest_hash,
        "python": platform.python_version(),
    }
    (work / "submission.json").write_text(json.dumps(submission, indent=2, sort_keys=True) + "\n")
    _plots(work, read_metrics(run_dir), result)
    (run_dir / "ckpt.pt").unlink(missing_ok=True)  # the resumable state is not part of a record
    _readme(work, cfg, submission, result, ev)
    log(f"record done in {time.perf_counter() - t_all:.0f}s")
    # Swap the finished folder in; a crash before this line leaves any previous record untouched.
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        work.rename(out)
        shutil.rmtree(old)
    else:
        work.rename(out)
    return submission


def _plots(folder: Path, metrics: list[dict], result) -> None:
    """training_curve.png (train loss, val bpb) and bit_allocation.png (bits per parameter per tensor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [m["step"] for m in metrics if "loss" in m]
    ax.plot(steps, [m["loss"] for m in metrics if "loss" in m], lw=1, label="train loss (nats)")
    val = [m for m in metrics if m.get("val_loss") is not None]
    if val:
        ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", label="val loss (nats)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training curve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "training_curve.png", dpi=110)
    plt.close(fig)

    tensors = [t for t in result.tensors if t.scheme != "passthrough"]
    fig, ax = plt.subplots(figsize=(9, max(3, 0.18 * len(tensors) + 1)))
    names = [t.name for t in tensors]
    bpp = [8 * t.bytes / max(1, _numel(t.shape)) for t in tensors]
    colors = ["C%d" % ((t.bits or 9) % 10) for t in tensors]
    ax.barh(range(len(tensors)), bpp, color=colors)
    ax.set_yticks(range(len(tensors)))
    ax.set_yticklabels([f"{n} ({'fp16' if t.bits is None else 'int%d' % t.bits})" for n, t in zip(names, tensors)],
                       fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("stored bits per parameter (codes + scales, after entropy coding)")
    ax.set_title(f"bit allocation: {result.bits_per_param:.3f} bits/param overall")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "bit_allocation.png", dpi=110)
    plt.close(fig)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _readme(folder: Path, cfg: RecordConfig, sub: dict, result, ev: dict) -> None:
    """The record's README.md: what was run and what it scored."""
    lines = [
        f"# Record: preset `{cfg.preset}`, budget {cfg.budget:,} bytes",
        "",
        f"- **val_bpb {sub['val_bpb']:.4f}** (sliding window {sub['eval_window']}, stride {sub['eval_stride']}), "
        f"val_loss {sub['val_loss']:.4f} nats",
        f"- unquantized model: val_bpb {sub['val_bpb_unquantized']:.4f}; quantization gap "
        f"{sub['quant_gap_bpb']:+.4f} bpb",
        f"- bytes: {sub['bytes_total']:,} total = {sub['bytes_model']:,} artifact + {sub['bytes_code']:,} code "
        f"({cfg.code_codec}); budget {cfg.budget:,}, headroom {cfg.budget - sub['bytes_total']:,}",
        f"- {sub['params']:,} parameters at {sub['bits_per_param']:.3f} bits per parameter",
        f"- time: data {sub['data_seconds']:.0f}s, train {sub['train_seconds']:.0f}s, "
        f"compress {sub['compress_seconds']:.0f}s, eval {sub['eval_seconds']:.0f}s",
        "",
        "| mode | val_loss | val_bpb |",
        "|---|---|---|",
    ]
    for name, m in ev["modes"].items():
        lines.append(f"| {name} | {m['val_loss']:.4f} | {m['val_bpb']:.4f} |")
    eval_cmd = f"qpack eval {Path(cfg.out) / 'model.qpk'} --data {cfg.data}"
    if cfg.window:
        eval_cmd += f" --window {cfg.window}"
    if cfg.stride:
        eval_cmd += f" --stride {cfg.stride}"
    if cfg.eval_tokens:
        eval_cmd += f" --max-tokens {cfg.eval_tokens}"
    lines += [
        "",
        "Check the score independently:",
        "",
        "```bash",
        eval_cmd,
        "```",
        "",
        "Files: `model.qpk` (the artifact), `submission.json`, `record.log`, `train/train.log`, "
        "`train/metrics.jsonl`, `compress.json`, `eval.json`, `training_curve.png`, `bit_allocation.png`.",
        "",
        "![training curve](training_curve.png)",
        "",
        "![bit allocation](bit_allocation.png)",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))

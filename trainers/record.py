"""The record pipeline: data -> train -> compress to the budget -> evaluate -> a record folder.

The folder looks like a parameter-golf record: README.md with the numbers, submission.json, the train and
eval logs, the artifact, and PNG plots of the training curve and of the per-tensor bit allocation. The code
counted against the budget is the trainer's own source (the files a submission would ship), compressed with
`code_codec` as it would be shipped, and a copy of it goes into the folder (`code/`).

For a seed preset (pr790, pr951, pr691, pr745) the preset's recipe sets the compress scheme and codecs, the
eval window/stride, the Hedge mixer and the TTT recipe. At scale "full" on CUDA with several GPUs the trainer
runs under torchrun with its wall-clock cap shortened by the GPTQ calibration allowance, so training plus
calibration stay inside the challenge's 600 s; the eval time is recorded against its own 600 s cap. At scale
"tiny" everything runs on the CPU in seconds (the test suite does so for every seed preset).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import qpack
from qpack.compress import DEFAULT_CODECS, CompressConfig, code_size, compress
from qpack.errors import QpackInputError

CODE_DIR = Path(__file__).resolve().parent / "gpt"


@dataclass(frozen=True)
class RecordConfig:
    """One record run; every field has a CLI flag of the same name."""

    preset: str = "cpu-smoke"  # trainer preset (trainers/gpt/presets.py)
    budget: int | None = 16_000_000  # bytes for artifact + code; None: 16MB, or 5 bits/param at scale tiny
    out: str = "records/cpu-smoke"  # the record folder (created; an existing one is replaced only when complete)
    data: str = "data"  # data folder; built from Debian doc packages when missing
    seed: int = 1337  # training seed
    overrides: tuple[str, ...] = ()  # trainer --key=value overrides
    scheme: str = "auto"  # compress scheme: auto = GPTQ with calibration from the train split
    calib_tokens: int = 16384  # calibration tokens for GPTQ
    codecs: tuple[str, ...] = DEFAULT_CODECS  # codecs compress tries per tensor
    code_codec: str = "lzma"  # how the shipped code is counted (compressed with this codec)
    window: int | None = None  # eval window (default: the model's sequence length)
    stride: int | None = None  # eval stride (default: window // 2)
    eval_tokens: int | None = None  # score only the first N val tokens (None: the whole val split)
    mixer: bool = False  # also score with the Hedge n-gram mixer
    ttt: bool = False  # also score with score-first TTT
    progress: bool = True  # progress bars on stderr
    scale: str = "full"  # full, or tiny: the preset shrunk for a CPU (trainers.gpt.presets)
    nproc: int | None = None  # GPUs for torchrun (None: the recipe's count when CUDA has that many, else 1)

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget <= 0:
            raise QpackInputError(f"budget must be positive, got {self.budget}")
        if self.eval_tokens is not None and self.eval_tokens < 2:
            raise QpackInputError("eval_tokens must be at least 2")


TINY_BITS_PER_PARAM = 5  # the default budget at scale tiny, as bits per parameter plus the code


def code_files() -> list[Path]:
    """The trainer's source files and the model's (qpack/models/gpt.py): what a submission ships beside the artifact."""
    from qpack.models import gpt

    return sorted([*CODE_DIR.glob("*.py"), Path(gpt.__file__)], key=lambda p: p.name)


def _log_to(path: Path) -> Callable[[str], None]:
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(msg + "\n")

    return log


def run_record(cfg: RecordConfig) -> dict[str, Any]:
    """Run the whole pipeline and write the record folder; returns submission.json's content."""
    from qpack.calibrate import build_model, collect, fisher, load_calibration_tokens, resolve_seq_len, tuner
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
    log(f"qpack record: preset {cfg.preset} ({cfg.scale} scale), budget "
        f"{f'{cfg.budget:,} bytes' if cfg.budget else 'by scale'}, out {out}")

    # 1. data
    t0 = time.perf_counter()
    paths = ensure_data(cfg.data, progress=cfg.progress, log=log)
    data_seconds = time.perf_counter() - t0

    # 2. train
    from .gpt.presets import preset_recipe

    recipe = preset_recipe(cfg.preset)
    run_dir = work / "train"
    tcfg = config_from_args(cfg.preset, str(paths.root), str(run_dir), [f"--seed={cfg.seed}", *cfg.overrides],
                            cfg.scale)
    caps = recipe.get("record", {})
    nproc = _nproc(cfg, tcfg, caps)
    t0 = time.perf_counter()
    if nproc > 1:
        summary = _train_torchrun(cfg, tcfg, caps, nproc, paths.root, run_dir, log)
    else:
        summary = train(tcfg, log=log)
    train_seconds = time.perf_counter() - t0
    final = run_dir / "final.pt"

    # 3. compress to the budget, the trainer's code counted as it ships
    t0 = time.perf_counter()
    code_bytes = code_size(code_files(), cfg.code_codec)
    sd, model_config, extra = load_state_dict(final)
    hessians = sensitivity = tune = None
    t_calib = time.perf_counter()
    if compress_kw_scheme(cfg, recipe) in ("auto", "gptq", "search"):
        tokens = load_calibration_tokens(paths.root, cfg.calib_tokens, vocab_size=model_config.get("vocab_size"))
        import torch

        # on the GPU the run trained on: calibration and tuning are forward/backward passes like training's
        net = build_model(sd, model_config, None).to("cuda" if tcfg.device == "cuda" and torch.cuda.is_available()
                                                     else "cpu")
        seq = resolve_seq_len(None, model_config, extra, available=len(tokens))  # the one rule, as the CLI's
        hessians = {k: v.cpu() for k, v in collect(net, tokens, seq, progress=False).items()}
        # the Fisher from the same rows, as `qpack compress --calib` computes it for loss proxy auto
        sensitivity = ({k: v.cpu() for k, v in fisher(net, tokens, seq_len=seq).items()}
                       if recipe.get("compress", {}).get("loss_proxy", "auto") in ("auto", "fisher") else None)
        # the unquantized float tensors fitted to this model after the solve, as `qpack compress --calib` does
        tune = tuner(net, tokens, seq_len=seq)
    calib_seconds = time.perf_counter() - t_calib  # reads training data: counts against the training cap
    artifact = work / "model.qpk"
    budget = cfg.budget or (16_000_000 if cfg.scale == "full"
                            else code_bytes + summary["params"] * TINY_BITS_PER_PARAM // 8)
    compress_kw = dict(recipe.get("compress", {}))
    compress_kw.pop("budget", None)
    if cfg.scheme != "auto" or not compress_kw:  # an explicit --scheme wins over the recipe
        compress_kw["scheme"] = cfg.scheme
    if cfg.codecs != DEFAULT_CODECS or "codecs" not in compress_kw:
        compress_kw["codecs"] = cfg.codecs
    ccfg = CompressConfig(budget=budget, code_bytes=code_bytes, **compress_kw)
    result = compress((sd, model_config, extra), artifact, ccfg, hessians=hessians, fisher=sensitivity,
                      tune=tune)  # the checkpoint read once
    compress_seconds = time.perf_counter() - t0
    calib_seconds += result.stages.get("tune", 0.0)  # tuning reads the calibration (training) tokens too
    (work / "compress.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    log(f"compress: {result.bytes_total:,} bytes total ({result.bytes_model:,} model + {code_bytes:,} code) "
        f"<= {budget:,}; {result.bits_per_param:.3f} bits/param in {compress_seconds:.1f}s")
    if caps.get("train_seconds") and cfg.scale == "full" and \
            summary["seconds"] + calib_seconds > caps["train_seconds"]:
        log(f"warning: training {summary['seconds']:.0f}s + GPTQ calibration {calib_seconds:.0f}s is over the "
            f"{caps['train_seconds']:.0f}s cap")

    # 4. evaluate the artifact (and the unquantized checkpoint, for the quantization gap)
    window, stride, mixer, ttt_cfg = _eval_recipe(cfg, tcfg, recipe)
    device = "cuda" if tcfg.device == "cuda" else "cpu"
    options = EvalOptions(window=window, stride=stride, max_tokens=cfg.eval_tokens, device=device,
                          mixer=MixerConfig() if mixer else None, ttt=ttt_cfg)
    t0 = time.perf_counter()
    ev = evaluate(artifact, paths.root, options=options)
    eval_seconds = time.perf_counter() - t0
    if caps.get("eval_seconds") and eval_seconds > caps["eval_seconds"]:
        log(f"warning: eval took {eval_seconds:.0f}s, over the {caps['eval_seconds']:.0f}s cap")
    base_options = EvalOptions(window=window, stride=stride, max_tokens=cfg.eval_tokens, device=device)
    ev_fp = evaluate(final, paths.root, options=base_options)
    (work / "eval.json").write_text(json.dumps({"artifact": ev, "unquantized": ev_fp}, indent=2) + "\n")
    for name, m in ev["modes"].items():
        log(f"eval {name}: val_loss {m['val_loss']:.4f} val_bpb {m['val_bpb']:.4f} ({m.get('seconds', 0):.1f}s)")
    log(f"eval unquantized sliding: val_bpb {ev_fp['modes']['sliding']['val_bpb']:.4f}")

    sliding = ev["modes"]["sliding"]
    headline = ev["modes"][list(ev["modes"])[-1]]  # the last mode run: TTT (+ mixer) when asked for
    submission = {
        # the challenge's own fields (records/track_10min_16mb/*/submission.json)
        "author": "qpack",
        "github_id": "",
        "name": f"qpack {cfg.preset}" + ("" if cfg.scale == "full" else f" ({cfg.scale} scale)"),
        "blurb": _blurb(cfg, recipe),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "val_bpb_headline": headline["val_bpb"],
        "val_loss_headline": headline["val_loss"],
        "headline_mode": list(ev["modes"])[-1],
        "val_bpb": sliding["val_bpb"],
        "val_loss": sliding["val_loss"],
        "val_bpb_unquantized": ev_fp["modes"]["sliding"]["val_bpb"],
        "quant_gap_bpb": sliding["val_bpb"] - ev_fp["modes"]["sliding"]["val_bpb"],
        "modes": {k: {"val_bpb": v["val_bpb"], "val_loss": v["val_loss"]} for k, v in ev["modes"].items()},
        "bytes_total": result.bytes_total,
        "bytes_model": result.bytes_model,
        "bytes_code": code_bytes,
        "budget": budget,
        "scale": cfg.scale,
        "nproc": nproc,
        "eval_cap_seconds": caps.get("eval_seconds"),
        "calib_seconds": calib_seconds,
        "train_cap_seconds": caps.get("train_seconds"),
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
    shutil.copyfile(run_dir / "train.log", work / f"train_seed{cfg.seed}.log")  # the challenge's log name
    (work / "code").mkdir()
    for f in code_files():  # the counted code, as shipped
        shutil.copyfile(f, work / "code" / f.name)
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
        f"# Record: preset `{cfg.preset}` ({cfg.scale} scale), budget {sub['budget']:,} bytes",
        "",
        f"- **val_bpb {sub['val_bpb']:.4f}** (sliding window {sub['eval_window']}, stride {sub['eval_stride']}), "
        f"val_loss {sub['val_loss']:.4f} nats",
        f"- unquantized model: val_bpb {sub['val_bpb_unquantized']:.4f}; quantization gap "
        f"{sub['quant_gap_bpb']:+.4f} bpb",
        f"- bytes: {sub['bytes_total']:,} total = {sub['bytes_model']:,} artifact + {sub['bytes_code']:,} code "
        f"({cfg.code_codec}); budget {sub['budget']:,}, headroom {sub['budget'] - sub['bytes_total']:,}",
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
    if sub.get("eval_window"):
        eval_cmd += f" --window {sub['eval_window']}"
    if sub.get("eval_stride"):
        eval_cmd += f" --stride {sub['eval_stride']}"
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
        f"The headline of the challenge's kind is the last mode run ({sub['headline_mode']}: val_bpb "
        f"{sub['val_bpb_headline']:.4f}); the sliding score above needs nothing but the artifact.",
        "",
        f"Files: `model.qpk` (the artifact), `submission.json`, `record.log`, `train_seed{cfg.seed}.log`, "
        "`code/` (the counted code), `train/train.log`, "
        "`train/metrics.jsonl`, `compress.json`, `eval.json`, `training_curve.png`, `bit_allocation.png`.",
        "",
        "![training curve](training_curve.png)",
        "",
        "![bit allocation](bit_allocation.png)",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))


def compress_kw_scheme(cfg: RecordConfig, recipe: dict[str, Any]) -> str:
    """The compress scheme a record uses: --scheme when given, else the preset's recipe, else auto."""
    if cfg.scheme != "auto":
        return cfg.scheme
    return recipe.get("compress", {}).get("scheme", "auto")


def _eval_recipe(cfg: RecordConfig, tcfg, recipe: dict[str, Any]):
    """(window, stride, mixer?, TTTConfig or None) from the flags, the preset's recipe and the scale."""
    from qpack.eval.ttt import RECIPES as TTT_RECIPES
    from qpack.eval.ttt import TTTConfig

    ev = recipe.get("eval", {})
    full = cfg.scale == "full"
    window = cfg.window or (ev.get("window") if full else None) or tcfg.seq_len
    stride = cfg.stride or (ev.get("stride") if full else None) or max(1, window // 2)
    mixer = cfg.mixer or bool(ev.get("mixer"))
    ttt = None
    if ev.get("ttt"):
        ttt = TTT_RECIPES[ev["ttt"]]
        if not full:  # a few chunks on a short val stream; sequences as long as the window
            ttt = dataclasses.replace(ttt, chunk=4 * window, train_batch=min(ttt.train_batch or 4, 4))
    elif cfg.ttt:
        ttt = TTTConfig()
    return window, stride, mixer, ttt


def _blurb(cfg: RecordConfig, recipe: dict[str, Any]) -> str:
    ev = recipe.get("eval", {})
    parts = [f"qpack's reference trainer with preset {cfg.preset}"]
    if recipe:
        parts.append(f"compressed by qpack ({recipe['compress'].get('scheme')}, budget solver, "
                     f"{'/'.join(recipe['compress'].get('codecs', ()))})")
        parts.append(f"score-first TTT recipe {ev.get('ttt')}" + (" with the Hedge mixer" if ev.get("mixer") else ""))
    return "; ".join(parts)


def _nproc(cfg: RecordConfig, tcfg, caps: dict[str, Any]) -> int:
    """GPUs to train on: --nproc, else the recipe's count when this machine has that many CUDA devices, else 1."""
    if cfg.nproc is not None:
        return cfg.nproc
    if tcfg.device != "cuda" or cfg.scale != "full":
        return 1
    import torch

    want = int(caps.get("nproc", 1))
    return want if torch.cuda.is_available() and torch.cuda.device_count() >= want else 1


def _train_torchrun(cfg: RecordConfig, tcfg, caps: dict[str, Any], nproc: int, data: Path, run_dir: Path,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """Train under torchrun on nproc GPUs with the cap shortened by the GPTQ allowance; returns the summary."""
    cap = []
    if caps.get("train_seconds") and cfg.scale == "full":  # the challenge's cap, GPTQ calibration inside it
        cap = [f"--max_seconds={float(caps['train_seconds']) - float(caps.get('calib_seconds', 0.0))}"]
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "trainers.gpt.train", f"--preset={cfg.preset}", f"--scale={cfg.scale}", f"--data={data}",
            f"--out={run_dir}", f"--seed={cfg.seed}", *cfg.overrides, *cap]
    log("torchrun: " + " ".join(args[3:]))
    proc = subprocess.run(args, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        log(line)
    if proc.returncode != 0:
        raise QpackInputError(f"torchrun training failed with exit code {proc.returncode}; see {run_dir}/train.log")
    lines = [ln for ln in (run_dir / "train.log").read_text().splitlines() if ln.startswith("summary ")]
    if not lines:
        raise QpackInputError(f"torchrun training wrote no summary; see {run_dir}/train.log")
    return json.loads(lines[-1][len("summary "):])

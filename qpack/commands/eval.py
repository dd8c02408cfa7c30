"""`qpack eval`: score an artifact or checkpoint on a data directory's val split (bits per byte)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..eval.mixer import MixerConfig
from ..eval.ttt import TTTConfig
from ._common import print_table

_MIX = MixerConfig()  # the flags' defaults are the library's, tuned on a train slice (benchmarks/eval/tune_mixer.py)
_TTT = TTTConfig()  # likewise (benchmarks/eval/tune_ttt.py)


def _orders(text: str) -> tuple[int, ...]:
    from ..errors import QpackInputError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise QpackInputError(f"--mixer-orders must be comma-separated integers, got {text!r}") from None


@click.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="folder with val shards")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="sentencepiece model [default: DATA/tokenizer.model]")
@click.option("--window", type=int, help="tokens per scoring window [default: the model's sequence length or 1024]")
@click.option("--stride", type=int, help="targets scored per window after the first [default: window // 2]")
@click.option("--plain/--no-plain", default=True, show_default=True, help="also score plain chunks (stride = window)")
@click.option("--mixer", is_flag=True, help="add the Hedge mixture with n-gram experts")
@click.option("--mixer-orders", default=",".join(map(str, _MIX.orders)), show_default=True, help="n-gram orders of the experts")
@click.option("--mixer-eta", default=_MIX.eta, show_default=True, type=float, help="Hedge learning rate")
@click.option("--mixer-decay", default=_MIX.decay, show_default=True, type=float,
              help="per-token discount of past losses (1 = plain cumulative Hedge)")
@click.option("--ttt", is_flag=True, help="add score-first test-time training")
@click.option("--ttt-chunk", default=_TTT.chunk, show_default=True, type=int, help="targets per TTT chunk")
@click.option("--ttt-lr", default=_TTT.lr, show_default=True, type=float)
@click.option("--ttt-epochs", default=_TTT.epochs, show_default=True, type=int)
@click.option("--ttt-optimizer", default=_TTT.optimizer, show_default=True, type=click.Choice(["sgd", "adamw"]))
@click.option("--ttt-params", default="all", show_default=True, help="all, last:K (blocks) or lora:R")
@click.option("--ttt-reset/--no-ttt-reset", default=False, show_default=True,
              help="restore the original weights when a document (BOS) starts")
@click.option("--max-tokens", type=int, help="score only the first N val tokens")
@click.option("--batch", default=8, show_default=True, type=int, help="windows per forward pass")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--arch", help="model factory module:function, for a model whose file names no known arch")
@click.option("--forward", "forward_spec",
              help="module:function called as function(model, input_ids) -> logits [B, T, vocab]")
@click.option("--distributed", is_flag=True,
              help="split the windows over torchrun's processes (on by itself under torchrun with WORLD_SIZE > 1)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the table")
@click.option("-q", "--quiet", is_flag=True, help="no progress bars")
def command(model: Path, data_dir: Path, tokenizer: Path | None, window: int | None, stride: int | None, plain: bool,
            mixer: bool, mixer_orders: str, mixer_eta: float, mixer_decay: float, ttt: bool, ttt_chunk: int,
            ttt_lr: float, ttt_epochs: int, ttt_optimizer: str, ttt_params: str, ttt_reset: bool,
            max_tokens: int | None, batch: int, device: str, arch: str | None, forward_spec: str | None,
            distributed: bool, as_json: bool, quiet: bool) -> None:
    """Score MODEL (.qpk artifact or checkpoint) on DATA's val split: val_loss and val_bpb per mode.

    Modes: plain (stride = window), sliding, +mixer, +TTT (and TTT+mixer when both are asked for).
    """
    from ..errors import QpackInputError
    from ..eval.mixer import MixerConfig
    from ..eval.run import EvalOptions, evaluate
    from ..eval.ttt import TTTConfig

    try:
        mix_cfg = MixerConfig(_orders(mixer_orders), mixer_eta, mixer_decay) if mixer else None
        ttt_cfg = TTTConfig(chunk=ttt_chunk, lr=ttt_lr, epochs=ttt_epochs, optimizer=ttt_optimizer,
                            params=ttt_params, reset_on_bos=ttt_reset) if ttt else None
    except ValueError as exc:
        raise QpackInputError(str(exc)) from None
    options = EvalOptions(window=window, stride=stride, batch=batch, device=device, max_tokens=max_tokens,
                          plain=plain, mixer=mix_cfg, ttt=ttt_cfg, arch=arch, forward=forward_spec,
                          distributed=distributed)
    bars: list = []
    if os.environ.get("RANK", "0") != "0":
        quiet = True  # one set of progress bars, from rank 0

    def progress(name: str, total: int):
        from tqdm import tqdm

        bar = tqdm(desc=name, total=total, unit="tok", file=sys.stderr, leave=False, dynamic_ncols=True)
        bars.append(bar)
        return bar.update

    try:
        result = evaluate(model, data_dir, tokenizer=tokenizer, options=options,
                          progress=None if quiet or as_json else progress)
    finally:
        for b in bars:
            b.close()
    if "modes" not in result:
        return  # rank > 0 of a distributed eval: rank 0 prints
    for w in result["warnings"]:
        click.echo(f"qpack: warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps(result))  # insertion order: modes stay in plain, sliding, mixer, ttt order
        return
    rows = []
    for name, m in result["modes"].items():
        rows.append([name, f"{m['val_loss']:.4f}", f"{m['val_bpb']:.4f}",
                     "-" if name == "sliding" else f"{m['delta_bpb_vs_sliding']:+.4f}", f"{m['tokens']:,}",
                     f"{m['bytes']:,}", f"{m['seconds']:.1f}", f"{m['tokens_per_s']:,.0f}"])
    ranks = f" x {result['world']} ranks" if result.get("world", 1) > 1 else ""
    click.echo(f"{result['model']} ({result['model_kind']}) on {result['data']}: window {result['window']}, "
               f"stride {result['stride']}, {result['device']}{ranks}")
    print_table(["mode", "val_loss", "val_bpb", "delta_bpb", "tokens", "bytes", "seconds", "tokens/s"], rows)
    if "mixer" in result:
        w = ", ".join(f"{n} {x:.3f}" for n, x in zip(result["mixer"]["experts"], result["mixer"]["final_weights"]))
        click.echo(f"mixer final weights: {w}")

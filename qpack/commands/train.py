"""`qpack train`: run the reference GPT trainer (trainers.gpt) from a preset plus --key=value overrides."""
from __future__ import annotations

import json
import sys

import click

from ._common import print_table


@click.command("train", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--preset", default="cpu-smoke", show_default=True, help="cpu-smoke, cpu-small or golf")
@click.option("--data", default=None, help="folder with golf shards and tokenizer.model (from `qpack data build`)")
@click.option("--out", default=None, help="run folder (default: runs/PRESET); an existing ckpt.pt there is resumed")
@click.option("--json", "as_json", is_flag=True, help="print the summary as one JSON object")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def command(preset, data, out, as_json, overrides):
    """Train a GPT; OVERRIDES are key=value (or --key=value) settings of TrainConfig and GPTConfig."""
    # the library never imports trainers at module level; the CLI is the one place that may
    from trainers.gpt.train import config_from_args, train

    cfg = config_from_args(preset, data, out, overrides)
    summary = train(cfg, log=lambda line: click.echo(line, err=True))
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
        return
    rows = [[k, _fmt(k, summary[k])] for k in ("steps", "tokens", "seconds", "tokens_per_s", "val_loss", "val_bpb",
                                               "params", "checkpoint") if k in summary]
    print_table(["metric", "value"], rows)
    sys.stdout.flush()


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if key.startswith("val_") else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)

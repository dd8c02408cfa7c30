"""`qpack train`: run the reference GPT trainer (trainers.gpt) from a preset plus --key=value overrides."""
from __future__ import annotations

import json
import sys

import click

from ._common import print_table


@click.command("train", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--preset", default="cpu-smoke", show_default=True,
              help="cpu-smoke, cpu-small, golf, or a seed record: pr790, pr951, pr691, pr745")
@click.option("--scale", default="full", show_default=True,
              help="full, or tiny: the preset's layers and switches at width 64 for a few CPU seconds")
@click.option("--data", default=None, help="folder with golf shards and tokenizer.model (from `qpack data build`)")
@click.option("--out", default=None, help="run folder (default: runs/PRESET); an existing ckpt.pt there is resumed")
@click.option("--dry-run", is_flag=True, help="print the resolved config and parameter count; train nothing")
@click.option("--json", "as_json", is_flag=True, help="print the summary as one JSON object")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def command(preset, scale, data, out, dry_run, as_json, overrides):
    """Train a GPT; OVERRIDES are key=value (or --key=value) settings of TrainConfig and GPTConfig."""
    # the library never imports trainers at module level; the CLI is the one place that may
    from trainers.gpt.train import config_from_args, dry_run as resolve, train

    cfg = config_from_args(preset, data, out, overrides, scale)
    if dry_run:
        plan = {"preset": preset, "scale": scale, **resolve(cfg)}
        if as_json:
            click.echo(json.dumps(plan, sort_keys=True))
            return
        m = cfg.model
        rows = [["preset", f"{preset} ({scale})"], ["params", f"{plan['params']:,}"],
                ["model", f"{m.n_layer} layers x {m.n_embd}, {m.n_head}/{m.n_kv_head} heads, MLP {m.mlp_mult:g}x, "
                          f"vocab {m.vocab_size}"],
                ["tokens/step", f"{cfg.global_batch_tokens or cfg.batch_size * cfg.seq_len * cfg.grad_accum:,} "
                                f"(seq {cfg.seq_len})"],
                ["schedule", f"max {cfg.max_steps:,} steps" + (f", cap {cfg.max_seconds:g}s" if cfg.max_seconds else "")
                 + (f", warmdown {cfg.warmdown_iters} steps" if cfg.warmdown_iters
                    else f", warmdown {cfg.warmdown_frac:g}")]]
        print_table(["setting", "value"], rows)
        click.echo("config " + json.dumps(cfg.to_dict(), sort_keys=True))
        return
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

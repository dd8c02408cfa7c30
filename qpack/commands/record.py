"""`qpack record`: data -> train -> compress to the budget -> evaluate -> record folder."""
from __future__ import annotations

import json

import click


@click.command("record", context_settings={"ignore_unknown_options": True})
@click.option("--preset", default="cpu-smoke", show_default=True,
              help="trainer preset: cpu-smoke, cpu-small, golf, or a seed record: pr790, pr951, pr691, pr745")
@click.option("--scale", default="full", show_default=True, help="full, or tiny: the preset shrunk for a CPU")
@click.option("--budget", default=None,
              help="bytes for artifact + code (16MB = 16,000,000); default 16MB, or 5 bits/param + code at tiny")
@click.option("--nproc", type=int, default=None, help="GPUs for torchrun (default: the recipe's 8 when present)")
@click.option("--out", default=None, help="record folder (default: records/PRESET)")
@click.option("--data", default="data", show_default=True, help="data folder (built when missing)")
@click.option("--seed", type=int, default=1337, show_default=True)
@click.option("--scheme", default="auto", show_default=True, help="compress scheme (auto: GPTQ with calibration)")
@click.option("--calib-tokens", type=int, default=16384, show_default=True)
@click.option("--codec", "codecs", multiple=True, help="codecs compress tries per tensor (default: ans, zstd, ans_cols)")
@click.option("--code-codec", default="lzma", show_default=True, help="codec the shipped code is counted with")
@click.option("--window", type=int, default=None, help="eval window (default: the model's sequence length)")
@click.option("--stride", type=int, default=None, help="eval stride (default: window // 2)")
@click.option("--eval-tokens", type=int, default=None, help="score only the first N val tokens")
@click.option("--mixer", is_flag=True, help="also score with the Hedge n-gram mixer")
@click.option("--ttt", is_flag=True, help="also score with score-first test-time training")
@click.option("--json", "as_json", is_flag=True, help="print submission.json to stdout")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def command(preset, scale, budget, nproc, out, data, seed, scheme, calib_tokens, codecs, code_codec, window, stride,
            eval_tokens, mixer, ttt, as_json, overrides):
    """Train PRESET, compress it to --budget, evaluate it, and write a record folder.

    Extra --key=value arguments override the trainer preset (e.g. --max_steps=100).
    """
    from ..compress import DEFAULT_CODECS
    from ..units import parse_size

    from trainers.record import RecordConfig, run_record  # the CLI is the one place qpack reaches trainers

    cfg = RecordConfig(preset=preset, budget=parse_size(budget) if budget else None, scale=scale, nproc=nproc,
                       out=out or f"records/{preset}" + ("" if scale == "full" else f"-{scale}"), data=data, seed=seed,
                       overrides=tuple(overrides), scheme=scheme, calib_tokens=calib_tokens,
                       codecs=tuple(codecs) or DEFAULT_CODECS, code_codec=code_codec, window=window, stride=stride,
                       eval_tokens=eval_tokens, mixer=mixer, ttt=ttt)
    sub = run_record(cfg)
    if as_json:
        click.echo(json.dumps(sub, indent=2, sort_keys=True))
        return
    click.echo("")
    click.echo(f"record      {cfg.out}")
    click.echo(f"val_bpb     {sub['val_bpb']:.4f}   (unquantized {sub['val_bpb_unquantized']:.4f}, gap {sub['quant_gap_bpb']:+.4f})")
    for name, m in sub["modes"].items():
        click.echo(f"  {name:<10}{m['val_bpb']:.4f}")
    click.echo(f"bytes       {sub['bytes_total']:,} / {sub['budget']:,} ({sub['bytes_model']:,} artifact + {sub['bytes_code']:,} code)")
    click.echo(f"bits/param  {sub['bits_per_param']:.3f} over {sub['params']:,} parameters")
    click.echo(f"time        train {sub['train_seconds']:.0f}s, compress {sub['compress_seconds']:.0f}s, eval {sub['eval_seconds']:.0f}s")

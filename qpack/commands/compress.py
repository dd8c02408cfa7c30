"""`qpack compress`: checkpoint -> .qpk artifact that fits a byte budget."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ._common import progress_bar, print_table


def _int_list(text: str, flag: str = "--bits") -> tuple[int, ...]:
    from ..errors import QpackInputError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise QpackInputError(f"{flag} must be a comma-separated list of integers, got {text!r}") from None


def _float_list(text: str) -> tuple[float, ...]:
    from ..errors import QpackInputError

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise QpackInputError(f"--steps must be a comma-separated list of numbers, got {text!r}") from None


@click.command("compress")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="artifact path (default: MODEL with .qpk)")
@click.option("--budget", help="size cap for artifact + code: 16MB = 16,000,000 bytes, 15.5MiB, or plain bytes")
@click.option("--bits", default=None, help="with --budget: candidate widths (default 2,3,4,5,6,7,8); without: one width (default 6)")
@click.option("--scheme", default="auto", show_default=True, help="auto (with --calib: GPTQ, on uniform steps when --budget is set; else GPTQ-lite), search, gptq, gptq_lite, sdclip, rtn, uniform (a step per block from a continuum)")
@click.option("--sdclip-k", multiple=True, type=float, help="with --scheme search: SDClip k values to try as well")
@click.option("--step", type=float, default=None, help="--scheme uniform without --budget: the grid step, in "
              "standard deviations of each matrix")
@click.option("--steps", default=None, help="with --budget: uniform steps (comma list, in standard deviations) the "
              "solver picks from [default for --scheme uniform: 0.015 to 4, 8 per octave]")
@click.option("--step-rows", default="auto", show_default=True,
              help="uniform steps in units of each matrix's std (flat), of each row's (std), or flat scaled per "
              "row by the row's mean Fisher (fisher, needs --calib); auto: flat for matrices with a Hessian "
              "(--calib), std for the others")
@click.option("--rdo", type=float, default=0.0, show_default=True,
              help="RDO rounding multiplier for uniform steps (0: nearest level)")
@click.option("--cd-passes", type=int, default=None,
              help="coordinate-descent sweeps after GPTQ on the uniform steps (needs --calib) [default: 0]")
@click.option("--tune-epochs", type=int, default=None,
              help="with --calib: epochs fitting the unquantized float tensors (norm gains, scales) to the float "
              "model's outputs on the calibration tokens, at no cost in bytes; 0 turns it off [default: 4]")
@click.option("--loss-proxy", type=click.Choice(["auto", "mse", "hessian", "relative", "fisher", "kfac"]), default="auto",
              show_default=True, help="how the solver compares errors across tensors: fisher weighs them by the "
              "model's loss gradients on --calib (auto: fisher with --calib, else mse; GPTQ still uses the Hessians)")
@click.option("--group-size", type=int, default=None, help="columns per scale group (default: one scale per row)")
@click.option("--codec", "codecs", multiple=True, help="codec spec to try per tensor, repeatable (default: ans, zstd and ans_cols); e.g. zstd:level=22")
@click.option("--calib", type=click.Path(path_type=Path), help="calibration tokens for GPTQ: shard dir, .bin shard, or text file")
@click.option("--calib-tokens", type=int, default=None, help="calibration tokens to use [default: 16384]")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="sentencepiece model for a text --calib file")
@click.option("--arch", help="model factory module:function, when the checkpoint carries no config")
@click.option("--forward", "forward_spec", help="module:function called as function(model, input_ids) -> logits, "
              "for models that take other arguments")
@click.option("--seq-len", type=int, default=None,
              help="calibration sequence length [default: the checkpoint's seq_len/train_seq_len/max_seq_len/"
              "block_size, else 1024, capped by the calibration tokens]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="where calibration runs the model [default: cuda when available, else cpu]")
@click.option("--lqer-rank", type=int, default=0, help="rank of low-rank error correction (0: off)")
@click.option("--lqer-top", type=int, default=0, help="how many tensors (largest error) get LQER")
@click.option("--lqer", "lqer_mode", type=click.Choice(["off", "auto", "on"]), default=None,
              help="with --budget: the solver picks which tensors get a low-rank error correction, its rank and "
              "factor widths, with the factor bytes inside the budget; auto (default): with --calib; on: data-free "
              "too; off: none")
@click.option("--lqer-ranks", default="4,8,16", show_default=True,
              help="when the solver chooses LQER: ranks to choose from")
@click.option("--lqer-bits", default="2,4", show_default=True,
              help="when the solver chooses LQER: factor widths (2 and/or 4)")
@click.option("--lqer-group", type=int, default=64, show_default=True,
              help="when the solver chooses LQER: columns per scale group of factor B")
@click.option("--code", "code_files", multiple=True, type=click.Path(path_type=Path), help="code files shipped with the artifact (counted in the budget)")
@click.option("--code-codec", default=None, help="count --code bytes compressed with this codec (e.g. lzma)")
@click.option("--passthrough", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True, help="dtype of small tensors")
@click.option("--min-numel", type=int, default=4096, show_default=True, help="smaller tensors pass through unquantized")
@click.option("--dry-run", is_flag=True, help="print the plan and predicted size; write nothing")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the table")
@click.option("-q", "--quiet", is_flag=True, help="no progress bars")
def command(model, output, budget, bits, scheme, sdclip_k, step, steps, step_rows, rdo, cd_passes, tune_epochs, loss_proxy, group_size, codecs, calib, calib_tokens, tokenizer, arch,
            forward_spec, seq_len, device, lqer_rank, lqer_top, lqer_mode, lqer_ranks, lqer_bits, lqer_group, code_files, code_codec, passthrough, min_numel, dry_run,
            as_json, quiet):
    """Compress MODEL (.pt or .safetensors) into a .qpk artifact that fits --budget."""
    from ..compress import CompressConfig, code_size, compress
    from ..errors import QpackInputError
    from ..units import parse_size

    _check_flags(calib, scheme, loss_proxy, code_files, code_codec, tokenizer=tokenizer, arch=arch,
                 forward=forward_spec, seq_len=seq_len, calib_tokens=calib_tokens, device=device,
                 cd_passes=cd_passes, tune_epochs=tune_epochs)
    if tune_epochs is not None and tune_epochs < 0:
        raise QpackInputError(f"--tune-epochs must be 0 or more, got {tune_epochs}")
    if not model.exists():
        raise QpackInputError(f"{model}: no such file")
    if model.is_dir():
        raise QpackInputError(f"{model}: is a directory, not a checkpoint (.pt or .safetensors)")
    if output is not None and output.is_dir():
        raise QpackInputError(f"{output}: is a directory; give the artifact's file name (e.g. model.qpk)")
    output = output or model.with_suffix(".qpk")
    if lqer_mode in ("auto", "on"):  # asked for by name: refuse what would silently turn it off
        if budget is None:
            raise QpackInputError(f"--lqer {lqer_mode} needs --budget (the solver trades factor bytes against the rest)")
        if lqer_rank:
            raise QpackInputError(f"--lqer {lqer_mode} chooses ranks itself; drop --lqer-rank/--lqer-top")
    opts = dict(scheme=scheme, group_size=group_size, passthrough_dtype=passthrough, min_numel=min_numel,
                lqer_rank=lqer_rank, lqer_top=lqer_top, sdclip_k=tuple(sdclip_k), loss_proxy=loss_proxy,
                lqer=lqer_mode or "auto", lqer_ranks=_int_list(lqer_ranks, "--lqer-ranks"),
                lqer_bits=_int_list(lqer_bits, "--lqer-bits"), lqer_group=lqer_group, step=step, rdo=rdo,
                step_rows=step_rows)
    if cd_passes is not None:
        opts["cd_passes"] = cd_passes
    if steps is not None:
        opts["steps"] = _float_list(steps)
    if bits and scheme == "uniform":
        raise QpackInputError("--scheme uniform stores int8 codes on a grid of steps: give --step or --steps, not --bits")
    if budget is not None:
        opts["budget"] = parse_size(budget)
        if bits:
            opts["bits"] = _int_list(bits)
    elif bits:
        widths = _int_list(bits)
        if len(widths) != 1:
            raise QpackInputError("without --budget, --bits takes one width (e.g. --bits 6)")
        opts["fixed_bits"] = widths[0]
    if codecs:
        opts["codecs"] = tuple(codecs)
    if code_files:
        opts["code_bytes"] = code_size(code_files, code_codec)
    cfg = CompressConfig(**opts)

    hessians = None
    progress = None if quiet or as_json else progress_bar
    from ..checkpoint import load_state_dict

    checkpoint = load_state_dict(model)  # read once: calibration and compress share it
    fisher = tuner = None
    if calib is not None:
        hessians, fisher, tuner = _calibrate(
            checkpoint, calib, calib_tokens or DEFAULT_CALIB_TOKENS, tokenizer, arch, forward_spec, seq_len, device,
            progress is not None, fisher_mode=loss_proxy if loss_proxy in ("fisher", "kfac", "auto") else None,
            tune_epochs=tune_epochs)
    result = compress(checkpoint, output, cfg, hessians=hessians, fisher=fisher, tune=tuner, dry_run=dry_run,
                      progress=progress)

    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    rows = [[t.name, "x".join(map(str, t.shape)), t.scheme, "-" if t.bits is None else str(t.bits), t.layout or "-",
             t.codec, f"{t.bytes:,}", f"{8 * t.bytes / max(1, _numel(t.shape)):.3f}", f"{t.rel_error:.4f}"]
            for t in result.tensors]
    print_table(["tensor", "shape", "scheme", "bits", "layout", "codec", "bytes", "bits/param", "rel err"], rows)
    d = result.as_dict()
    click.echo("")
    click.echo(f"model bytes    {result.bytes_model:>14,}")
    click.echo(f"code bytes     {result.bytes_code:>14,}")
    click.echo(f"total bytes    {result.bytes_total:>14,}")
    if result.budget is not None:
        click.echo(f"budget         {result.budget:>14,}   headroom {d['headroom']:,} bytes")
    click.echo(f"params         {result.params:>14,}   {result.bits_per_param:.3f} bits/param")
    if result.tune is not None:
        t = result.tune
        kept = (f"epoch {t['epoch_kept']} of {t['epochs']} kept" if t["changed"] else
                f"no epoch of {t['epochs']} did better: unchanged")
        click.echo(f"tuned          {t['tensors']:>14,}   float tensors; held-out KL {t['heldout_kl_before']:.5f} -> "
                   f"{t['heldout_kl_after']:.5f} nats/token, {kept}")
    click.echo(f"time           {result.seconds:>13.1f}s")
    click.echo("dry run: nothing written" if dry_run else f"wrote {result.output}")


DEFAULT_CALIB_TOKENS = 16384


def _check_flags(calib, scheme: str, loss_proxy: str, code_files, code_codec, **calib_only) -> None:
    """Flags that would silently do nothing are errors: calibration options without --calib, and so on."""
    from ..errors import QpackInputError

    if calib is None:
        given = [f"--{name.replace('_', '-')}" for name, value in calib_only.items() if value is not None]
        if given:
            verb = "only matters" if len(given) == 1 else "only matter"
            raise QpackInputError(f"{', '.join(given)} {verb} with --calib (calibration data for GPTQ)")
        if scheme == "gptq":
            raise QpackInputError("--scheme gptq needs Hessians: pass --calib DATA (or use gptq_lite, sdclip, rtn)")
        if loss_proxy in ("hessian", "relative"):
            raise QpackInputError(f"--loss-proxy {loss_proxy} weighs errors by Hessians: pass --calib DATA")
        if loss_proxy in ("fisher", "kfac"):
            raise QpackInputError(f"--loss-proxy {loss_proxy} weighs errors by the model's loss gradients on "
                                  "calibration tokens: pass --calib DATA")
    if code_codec is not None and not code_files:
        raise QpackInputError("--code-codec compresses the --code files: pass --code FILE as well")


def _calibrate(checkpoint: tuple, calib: Path, n_tokens: int, tokenizer, arch, forward_spec, seq_len, device,
               progress: bool, fisher_mode: str | None = None, tune_epochs: int | None = None
               ) -> tuple[dict, dict | None, Any]:
    """Hessians (and with `fisher_mode` the diagonal Fisher, from the same tokens) for the checkpoint's weights,
    computed on `device`, returned on the CPU, and the passthrough tuner (qpack.tune) on those tokens. A model whose
    loss cannot be differentiated fails "fisher"; under "auto" it gets no Fisher (so mse) and a one-line warning.
    A model without logits gets no tuner: a one-line warning, or an error when --tune-epochs asked for one."""
    import torch

    from ..calibrate import build_model, calibrate, fisher, load_calibration_tokens, resolve_seq_len, tuner
    from ..errors import QpackInputError
    from ..forward import adapter_for

    if device == "cuda" and not torch.cuda.is_available():
        raise QpackInputError("--device cuda: no CUDA device is available")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sd, config, extra = checkpoint
    vocab = (config or {}).get("vocab_size")
    tokens = load_calibration_tokens(calib, n_tokens, tokenizer, vocab)
    net = build_model(sd, config, arch).to(device)
    adapter = adapter_for(net, forward_spec)
    length = resolve_seq_len(seq_len, config, extra, available=len(tokens) - adapter.extra_tokens)
    hessians = calibrate(net, tokens, forward=adapter.forward, seq_len=length, progress=progress)
    sens = None
    if fisher_mode is not None:
        try:
            sens = fisher(net, tokens, forward=adapter.forward, seq_len=length, progress=progress)
        except QpackInputError as exc:
            if fisher_mode != "auto":
                raise
            click.echo(f"qpack: warning: no Fisher sensitivity, loss proxy mse: {exc}", err=True)
    tune = None
    if tune_epochs != 0:
        try:
            tune = tuner(net, tokens, forward=adapter.forward, seq_len=length, epochs=tune_epochs, progress=progress)
        except QpackInputError as exc:
            if tune_epochs is not None:
                raise
            click.echo(f"qpack: warning: no passthrough tuning: {exc}", err=True)
    return ({k: v.cpu() for k, v in hessians.items()},
            None if sens is None else {k: v.cpu() for k, v in sens.items()}, tune)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

"""`qpack bench-codecs`: how small each codec, level and layout makes quantized weights, and how fast."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import QpackInputError


@click.command("bench-codecs")
@click.argument("input_path", metavar="[INPUT]", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--bits", "bits_text", default=None, metavar="LIST",
              help="Bit widths to quantize at, comma-separated (default 4,5,6,8; 2..8).")
@click.option("--codecs", "codecs_text", default=None, metavar="NAMES",
              help="Codec names, comma-separated (default: every registered codec, plugins included).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw bits per weight against decode speed to this PNG file.")
@click.option("--full", is_flag=True, help="Embedded sample: a whole 9 x 512 model (about 17M weights) instead of 2M.")
@click.option("--sample-weights", type=int, default=None, hidden=True,
              help="Truncate the embedded sample to about this many weights (tests).")
@click.option("--slow-limit", type=int, default=None, hidden=True,
              help="Weights the slow settings see (default 524288; 0 = all).")
def command(input_path, bits_text, codecs_text, as_json, plot_path, full, sample_weights, slow_limit) -> None:
    """Quantize INPUT (a checkpoint, .safetensors or .qpk; default: an embedded synthetic GPT sample) per row
    at each bit width and report, for every codec, level and layout: bytes, bits per weight, excess over the
    order-0 entropy and compress / decompress speed."""
    from tqdm import tqdm

    from .. import bench

    bits = bench.parse_bits(bits_text if bits_text is not None else bench.DEFAULT_BITS)
    settings = bench.default_settings(bench.parse_codecs(codecs_text))
    if plot_path is not None:
        if plot_path.suffix.lower() != ".png":
            raise QpackInputError(f"--plot {plot_path}: the plot is a PNG; give a file name ending in .png")
        if not plot_path.parent.resolve().is_dir():
            raise QpackInputError(f"--plot {plot_path}: directory {plot_path.parent} does not exist")
    if sample_weights is not None and sample_weights <= 0:
        raise QpackInputError(f"--sample-weights must be positive, got {sample_weights}")
    if slow_limit is not None and slow_limit < 0:
        raise QpackInputError(f"--slow-limit must be 0 (no limit) or positive, got {slow_limit}")
    limit = bench.DEFAULT_SLOW_LIMIT if slow_limit is None else (slow_limit or None)
    if full and slow_limit is None:
        limit = None  # --full asks for the whole model, slow settings included

    if input_path is None:
        weights, codes = bench.synthetic_sample(full=full, max_weights=sample_weights), None
    else:
        weights, codes = bench.load_input(input_path)
    if codes is None:
        codes = bench.bench_codes_from_weights(weights, bits)
    elif bits_text is not None:
        held = sorted(codes)
        codes = {b: c for b, c in codes.items() if b in bits}
        if not codes:
            raise QpackInputError(f"--bits {bits_text}: the artifact {input_path} holds codes at {held} bits only")

    total = len(codes) * len(settings)
    with tqdm(total=total, desc="bench-codecs", unit="run", leave=False, disable=None) as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)

        result = bench.run_bench(codes, settings, slow_limit=limit, progress=progress)

    if plot_path is not None:
        bench.plot(result, plot_path)
    if as_json:
        click.echo(json.dumps(result.to_json(), sort_keys=False))
    else:
        click.echo(bench.format_table(result))
        if any(r.weights != result.weights[r.bits] for r in result.rows):
            click.echo(f"\nsubset: slow settings ran on every k-th row, at most {limit:,} weights per width; "
                       "their excess is against that subset's entropy.")

"""`qpack data build`: corpus -> tokenizer -> golf-format shards + manifest.json."""
from __future__ import annotations

import json

import click

from ..data.build import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, DEFAULT_VOCAB, build_data
from ..errors import QpackInputError
from ..units import format_size, parse_size


@click.group(name="data")
def command() -> None:
    """Prepare training and validation data."""


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if k else str(c).ljust(w) for k, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


@command.command(name="build")
@click.option("--corpus", "corpus", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Text instead of the Debian docs: .txt (one document) or .jsonl ({\"text\": ...} per line). "
                   "Repeatable.")
@click.option("--vocab", type=int, default=DEFAULT_VOCAB, show_default=True, help="Tokenizer vocabulary size.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="data", show_default=True,
              help="Data directory to write.")
@click.option("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, show_default=True,
              help="Share of documents held out for validation (chosen by document hash).")
@click.option("--max-bytes", default=None, help="Cap the corpus at this much text (e.g. 4MB), whole documents.")
@click.option("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, show_default=True,
              help="Tokens per shard file.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Where downloaded .debs and their extraction live [default: DIR/cache].")
@click.option("--force", is_flag=True, help="Rebuild even when DIR already holds this build.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def build(corpus, vocab, out_dir, val_fraction, max_bytes, shard_tokens, cache_dir, force, as_json) -> None:
    """Build DIR: tokenizer.model, NAME_{train,val}_NNNNNN.bin and manifest.json."""
    try:
        cap = None if max_bytes is None else parse_size(max_bytes)
    except ValueError as exc:
        raise QpackInputError(f"--max-bytes: {exc}") from None
    result = build_data(out_dir, corpus=list(corpus) or None, vocab=vocab, val_fraction=val_fraction,
                        max_bytes=cap, shard_tokens=shard_tokens, force=force, progress=not as_json,
                        cache_dir=cache_dir)
    m = result.manifest
    if as_json:
        click.echo(json.dumps({
            "out": str(result.paths.root), "reused": result.reused, "manifest_hash": m["manifest_hash"],
            "tokenizer": str(result.paths.tokenizer), "vocab_size": m["tokenizer"]["vocab_size"],
            "sources": m["sources"], "note": m.get("note"),
            "splits": {k: {"docs": v["docs"], "bytes": v["bytes"], "tokens": v["tokens"],
                           "shards": [s["file"] for s in v["shards"]]} for k, v in m["splits"].items()},
            "timings": {k: round(v, 3) for k, v in result.timings.items()},
        }, sort_keys=True))
        return
    src_rows = [[s["name"], s.get("version") or "-", str(s["docs"]), format_size(s["bytes"]),
                 (s["sha256"] or "")[:12]] for s in m["sources"]]
    click.echo(_table(src_rows, ["source", "version", "docs", "text", "sha256"]))
    click.echo("")
    split_rows = [[k, str(v["docs"]), f"{v['bytes']:,}", f"{v['tokens']:,}",
                   f"{v['bytes'] / max(v['tokens'] - v['docs'], 1):.3f}", str(len(v["shards"]))]
                  for k, v in m["splits"].items()]
    click.echo(_table(split_rows, ["split", "docs", "bytes", "tokens", "bytes/token", "shards"]))
    click.echo("")
    state = "reused" if result.reused else "built"
    times = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in result.timings.items())
    click.echo(f"{state} {result.paths.root} (vocab {m['tokenizer']['vocab_size']}, manifest "
               f"{m['manifest_hash'][:12]}){': ' + times if times else ''}")
    if m.get("note"):
        click.echo(f"note: {m['note']}")

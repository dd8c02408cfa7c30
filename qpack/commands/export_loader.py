"""`qpack export-loader`: write qpack_load.py, a self-contained .qpk loader to ship beside an artifact."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("export-loader")
@click.option("-o", "--output", default="qpack_load.py", show_default=True, type=click.Path(path_type=Path),
              help="where to write the loader")
@click.option("--codecs", default=None, help="comma-separated codecs the loader reads (raw is always in); "
              "default: those of --for, else ans,zstd,ans_cols (what compress uses by default)")
@click.option("--for", "artifact", default=None, type=click.Path(path_type=Path),
              help="include exactly the codecs this artifact uses")
@click.option("--source", is_flag=True, help="write the readable source instead of the shipped (minified, "
              "lzma-compressed) form")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the summary")
def command(output: Path, codecs: str | None, artifact: Path | None, source: bool, as_json: bool) -> None:
    """Write a loader whose load(path) returns an artifact's state dict using only numpy and torch.

    The shipped form (the default) is what a submission counts: pass it to `qpack compress --code`.
    """
    from ..compress import DEFAULT_CODECS
    from ..container import atomic_write_bytes
    from ..errors import QpackInputError
    from ..loader import artifact_codecs, export_loader, parse_codecs

    if codecs is not None and artifact is not None:
        raise QpackInputError("give --codecs or --for, not both")
    names = artifact_codecs(artifact) if artifact is not None else parse_codecs(codecs or ",".join(DEFAULT_CODECS))
    exported = export_loader(names)
    data = exported.source.encode() if source else exported.shipped
    atomic_write_bytes(output, data)
    rep = {"output": str(output), "codecs": list(exported.codecs), "form": "source" if source else "shipped",
           "bytes": len(data), "bytes_source": len(exported.source.encode()), "bytes_shipped": len(exported.shipped)}
    if as_json:
        click.echo(json.dumps(rep, sort_keys=True))
        return
    click.echo(f"wrote {output}: {rep['form']} loader for {', '.join(exported.codecs)}, {len(data):,} bytes "
               f"(source {rep['bytes_source']:,}, shipped {rep['bytes_shipped']:,})")

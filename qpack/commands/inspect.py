"""`qpack inspect`: what an artifact holds, tensor by tensor, and what each costs in bytes."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import click

from ._common import print_table


def codec_label(spec: dict[str, Any]) -> str:
    """zstd(level=22) from {"name": "zstd", "params": {"level": 22}}."""
    inner = ",".join(f"{k}={v}" for k, v in sorted(spec["params"].items()))
    return f"{spec['name']}({inner})" if inner else spec["name"]


def tensor_rows(art) -> list[dict[str, Any]]:
    """One JSON-able record per tensor: layout, codecs and encoded bytes by part."""
    from ..artifact import DTYPES

    rows = []
    for e in art.entries:
        parts = art.section_bytes(e["name"])
        numel = math.prod(e["shape"])
        nbytes = sum(parts.values())
        row: dict[str, Any] = {"name": e["name"], "shape": list(e["shape"]), "kind": e["kind"], "dtype": e["dtype"],
                               "params": numel, "bytes": nbytes,
                               "bits_per_param": round(8 * nbytes / numel, 6) if numel else None}
        if e["kind"] == "quant":
            lr = e["lowrank"]
            row.update(scheme=e["scheme"], bits=e["bits"], group_size=e["group_size"], layout=e["layout"],
                       codec=e["codes"]["codec"], scale_codec=e["scales"]["codec"],
                       scale_layout=e["scales"]["layout"], lowrank_rank=lr["rank"] if lr else None,
                       col_scale="col_scale" in e,
                       bytes_codes=parts["codes"], bytes_scales=parts["scales"], bytes_lowrank=parts["lowrank"])
        else:
            import numpy as np

            row.update(scheme="raw", bits=8 * np.dtype(DTYPES[e["dtype"]][1]).itemsize, group_size=None,
                       layout=None, codec=e["data"]["codec"], scale_codec=None, scale_layout=None,
                       lowrank_rank=None, col_scale=False, bytes_codes=parts["data"], bytes_scales=0,
                       bytes_lowrank=0)
        rows.append(row)
    return rows


def report(path: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """The inspect JSON object: {"path", "bytes_total", "params", "bits_per_param", "meta", "tensors"}."""
    from ..artifact import read_artifact

    art = read_artifact(path)
    if verify:  # decode everything: proves every codec frame and code range, not just the checksums
        for name in art.names():
            art.tensor(name)
    tensors = tensor_rows(art)
    params = sum(t["params"] for t in tensors)
    total = art.container.size
    return {
        "path": os.fspath(path),
        "bytes_total": total,
        "bytes_overhead": total - sum(t["bytes"] for t in tensors),
        "params": params,
        "bits_per_param": round(8 * total / params, 6) if params else None,
        "meta": art.meta,
        "tensors": tensors,
    }


@click.command("inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the table")
@click.option("--verify", is_flag=True, help="also decode every tensor (checksums are always verified)")
def command(artifact: Path, as_json: bool, verify: bool) -> None:
    """Show each tensor of ARTIFACT: shape, scheme, bits, group size, layout, codec, bytes, bits/param."""
    rep = report(artifact, verify)
    if as_json:
        click.echo(json.dumps(rep, sort_keys=True))
        return
    rows = []
    for t in rep["tensors"]:
        codec = codec_label(t["codec"])
        if t["scale_codec"] is not None and t["scale_codec"] != t["codec"]:
            codec += f" / scales {codec_label(t['scale_codec'])}"
        scheme = t["scheme"] + ("+cols" if t["col_scale"] else "") + (f"+lqer{t['lowrank_rank']}"
                                                                     if t["lowrank_rank"] else "")
        rows.append([t["name"], "x".join(map(str, t["shape"])) or "scalar", scheme if t["kind"] == "quant"
                     else f"raw {t['dtype']}", str(t["bits"]), str(t["group_size"] or "-"), t["layout"] or "-", codec,
                     f"{t['bytes']:,}", "-" if t["bits_per_param"] is None else f"{t['bits_per_param']:.3f}"])
    print_table(["tensor", "shape", "scheme", "bits", "group", "layout", "codec", "bytes", "bits/param"], rows)
    meta = rep["meta"]
    click.echo("")
    click.echo(f"file           {rep['path']}")
    click.echo(f"tensors        {len(rep['tensors']):>14,}")
    click.echo(f"params         {rep['params']:>14,}")
    click.echo(f"bytes total    {rep['bytes_total']:>14,}   (manifest and framing {rep['bytes_overhead']:,})")
    bpp = rep["bits_per_param"]
    click.echo(f"bits/param     {'-' if bpp is None else f'{bpp:.4f}':>14}")
    click.echo(f"qpack version  {meta.get('qpack_version', '?'):>14}   model config: "
               f"{'yes' if meta.get('model_config') else 'none'}")

"""`qpack decompress`: .qpk artifact -> dequantized state dict (.pt or .safetensors), written atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click


_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@click.command("decompress")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="output checkpoint: .pt/.pth/.bin (torch) or .safetensors")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the summary")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
def command(artifact: Path, output: Path, as_json: bool, quiet: bool) -> None:
    """Dequantize ARTIFACT into a float checkpoint; the model config travels with it.

    A .pt file holds {"model": state_dict, "config": config} (a bare state dict when the artifact has no
    config); a .safetensors file keeps the config as JSON in its metadata key "qpack_config".
    """
    from ..artifact import read_artifact
    from ..statedict import assemble
    from ..checkpoint import save_state_dict
    from ..errors import QpackInputError

    if output.suffix.lower() not in _SUFFIXES:
        raise QpackInputError(f"{output}: output must end in {', '.join(_SUFFIXES)}")
    if output.exists() and artifact.exists() and os.path.samefile(output, artifact):
        raise QpackInputError(f"{output}: refusing to overwrite the input artifact")
    if output.is_dir():
        raise QpackInputError(f"{output}: is a directory; give a file name ending in .pt or .safetensors")
    if not output.parent.is_dir():
        raise QpackInputError(f"{output}: directory {output.parent} does not exist")
    art = read_artifact(artifact)
    state = assemble(art)  # row blocks re-joined, tied names restored
    if output.suffix.lower() == ".safetensors":  # safetensors refuses tensors that share memory
        seen: set[int] = set()
        for name, t in state.items():
            if t.data_ptr() in seen:
                state[name] = t.clone()
            seen.add(t.data_ptr())
    save_state_dict(output, state, art.model_config)
    params = sum(t.numel() for t in state.values())
    summary = {
        "artifact": os.fspath(artifact),
        "path": os.fspath(output),
        "format": "safetensors" if output.suffix.lower() == ".safetensors" else "torch",
        "tensors": len(state),
        "params": params,
        "bytes": output.stat().st_size,
        "config": art.model_config is not None,
    }
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
        return
    click.echo(f"wrote {summary['path']} ({summary['format']}): {summary['tensors']} tensors, {params:,} params, "
               f"{summary['bytes']:,} bytes" + (", with model config" if summary["config"] else ""))

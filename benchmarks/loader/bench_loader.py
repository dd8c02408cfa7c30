"""Load a 16 MB, ~35M-parameter ANS artifact with the shipped loader and with qpack.load, in one process.

    PYTHONPATH=. python benchmarks/loader/bench_loader.py [--work /tmp/qpack_loader_bench]

Builds a random-but-realistic state dict (Laplace weights; 11 layers x 512, attention 4 x 512^2, MLP 4x,
1024 x 512 tied embedding), compresses it with `qpack compress --budget 16MB --codec ans --scheme rtn`
(reused if present), exports the ANS-only shipped loader, and times both loads (best of 3, same process,
interleaved) after checking they are bit-identical. Writes results.json and results.md here.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Laplace-distributed weights of a golf-shaped GPT (tied embedding stored once)."""
    g = torch.Generator().manual_seed(seed)
    lap = lambda *s: torch.empty(*s).exponential_(generator=g) * torch.randint(0, 2, s, generator=g).mul(2).sub(1) \
        * 0.02  # noqa: E731  (Laplace as a signed exponential)
    sd = {"tok_emb.weight": lap(1024, 512)}
    for i in range(11):
        for n in ("q", "k", "v", "o"):
            sd[f"blocks.{i}.attn.{n}.weight"] = lap(512, 512)
        sd[f"blocks.{i}.mlp.fc.weight"] = lap(2048, 512)
        sd[f"blocks.{i}.mlp.proj.weight"] = lap(512, 2048)
        sd[f"blocks.{i}.norm.weight"] = torch.ones(512)
    sd["lm_head.weight"] = sd["tok_emb.weight"]
    return sd


def fingerprint(sd):
    h = hashlib.sha256()
    for k, t in sd.items():
        h.update(k.encode())
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/qpack_loader_bench")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    art = work / "model.qpk"
    from qpack.compress import compress
    from qpack.loader import export_loader
    import qpack

    sd = state_dict()
    params = sum(t.numel() for k, t in sd.items() if k != "lm_head.weight")
    t_compress = None  # None: the artifact of an earlier run was reused
    if not art.exists():
        t0 = time.perf_counter()
        compress(sd, art, budget=16_000_000, codecs=("ans",), scheme="rtn")
        t_compress = round(time.perf_counter() - t0, 1)
    loader = work / "qpack_load.py"
    exported = export_loader(["ans"])
    loader.write_bytes(exported.shipped)
    spec = importlib.util.spec_from_file_location("qpack_load", loader)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a, b = qpack.load(art), mod.load(art)
    identical = list(a) == list(b) and fingerprint(a) == fingerprint(b)
    del a, b
    times = {"qpack.load": [], "shipped loader": []}
    for _ in range(args.repeat):
        for label, fn in (("qpack.load", qpack.load), ("shipped loader", mod.load)):
            t = time.perf_counter()
            fn(art)
            times[label].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    res = {
        "artifact_bytes": art.stat().st_size, "params": params, "compress_seconds": t_compress,
        "loader_shipped_bytes": len(exported.shipped), "loader_source_bytes": len(exported.source.encode()),
        "bit_identical": identical, "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "best_seconds": {k: round(v, 3) for k, v in best.items()},
        "ratio_loader_over_qpack": round(best["shipped loader"] / best["qpack.load"], 3),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "note": "shared machine: ratios measured in one process are what to read"},
    }
    (HERE / "results.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    md = ["| loader | best of %d (s) | all runs (s) |" % args.repeat, "|---|---|---|"]
    md += [f"| {k} | {best[k]:.3f} | {', '.join(f'{x:.3f}' for x in v)} |" for k, v in times.items()]
    (HERE / "results.md").write_text(
        f"Artifact: {res['artifact_bytes']:,} bytes, {params:,} parameters, ANS v2 frames; shipped ANS-only loader "
        f"{res['loader_shipped_bytes']:,} bytes; bit-identical: {identical}.\n\n" + "\n".join(md)
        + f"\n\nratio shipped loader / qpack.load: **{res['ratio_loader_over_qpack']:.2f}x**\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

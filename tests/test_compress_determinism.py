"""`qpack compress` gives the same bytes in fresh processes whatever PYTHONHASHSEED and the thread count are,
and those bytes are pinned: golden sha256 per configuration in tests/compress_golden.json.

Encoders are allowed to change their output on purpose (a new codec version, a better solver); then regenerate
the goldens with `python tests/test_compress_determinism.py --update` and say why in the commit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("compress_golden.json")
# name -> compress flags; passthrough tensors, a tied pair and row splits are in every model
CONFIGS = {
    "rtn-default-codecs": ["--budget", "45KB", "--scheme", "rtn", "--bits", "4,5,6"],
    "rtn-zstd": ["--budget", "80KB", "--scheme", "rtn", "--codec", "zstd"],
    "sdclip-ans-lzma": ["--budget", "40KB", "--scheme", "sdclip", "--bits", "3,5", "--codec", "ans", "--codec", "lzma"],
}
# (PYTHONHASHSEED, torch threads): set iteration order and intra-op parallelism both vary
ENVIRONMENTS = [("0", 1), ("1", 2), ("4242", 2)]

_DRIVER = r"""
import contextlib, hashlib, io, json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from qpack.cli import main
out = {}
for name, ckpt, target, flags in json.loads(sys.argv[2]):
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            main(["compress", ckpt, "-o", target, "--min-numel", "64", "-q", "--json", *flags], standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
    out[name] = hashlib.sha256(open(target, "rb").read()).hexdigest()
print(json.dumps(out))
"""


def seeded_checkpoint(path: Path) -> Path:
    """A small GPT-shaped state dict from a fixed seed: matrices, norms (passthrough), a tied embedding."""
    g = torch.Generator().manual_seed(1234)
    emb = torch.randn(192, 64, generator=g) * 0.05
    sd = {"tok_emb.weight": emb}
    for i in range(2):
        sd[f"blocks.{i}.norm.weight"] = 1 + 0.1 * torch.randn(64, generator=g)
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.randn(192, 64, generator=g) * 0.08
        sd[f"blocks.{i}.mlp.fc.weight"] = torch.randn(128, 64, generator=g).pow(3) * 0.05
        sd[f"blocks.{i}.mlp.proj.weight"] = torch.randn(64, 128, generator=g) * 0.06
        sd[f"blocks.{i}.attn_scale"] = torch.full((64,), 0.5) + 0.01 * torch.arange(64)
    sd["lm_head.weight"] = emb  # tied: stored once
    torch.save(sd, path)
    return path


def compress_hashes(workdir: Path, hash_seed: str, threads: int) -> dict[str, str]:
    """sha256 of each configuration's artifact, compressed in one fresh process with this environment."""
    ckpt = seeded_checkpoint(workdir / "model.pt")
    jobs = [(name, str(ckpt), str(workdir / f"{name}-{hash_seed}.qpk"), flags) for name, flags in CONFIGS.items()]
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", _DRIVER, str(threads), json.dumps(jobs)], env=env, cwd=workdir,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_compress_bytes_do_not_depend_on_hash_seed_or_threads_and_match_the_goldens(tmp_path):
    results = {}
    for seed, threads in ENVIRONMENTS:
        work = tmp_path / f"{seed}-{threads}"
        work.mkdir()
        results[(seed, threads)] = compress_hashes(work, seed, threads)
    first = results[ENVIRONMENTS[0]]
    for env, hashes in results.items():
        assert hashes == first, f"environment {env} gave other bytes than {ENVIRONMENTS[0]}"
    golden = json.loads(GOLDEN.read_text())
    assert first == golden, ("compress output changed; if on purpose, run "
                             "`python tests/test_compress_determinism.py --update` and commit the new goldens")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_compress_determinism.py --update   (rewrites tests/compress_golden.json)")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        hashes = compress_hashes(Path(d), *ENVIRONMENTS[0])
    GOLDEN.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}: {hashes}")

"""Named starting points for `qpack train --preset NAME`; every value can still be overridden by --key=value."""
from __future__ import annotations

from typing import Any

from qpack.errors import QpackInputError

from .train import TrainConfig, with_values

PRESETS: dict[str, dict[str, Any]] = {
    # about 0.59M parameters; about a minute on 2 CPU cores (2,048 tokens per step)
    "cpu-smoke": dict(
        vocab_size=1024, n_layer=4, n_embd=128, n_head=4, n_kv_head=2, mlp_mult=2.0,
        seq_len=256, batch_size=8, max_steps=300, warmup_steps=10, warmdown_frac=0.3,
        log_every=25, val_every=100, val_tokens=65536, ckpt_every=100, device="cpu",
        out="runs/cpu-smoke",
    ),
    # about 2M parameters; a 15-minute wall-clock cap on 2 CPU cores (4,096 tokens per step, ~4.7k tokens/s)
    "cpu-small": dict(
        vocab_size=1024, n_layer=4, n_embd=256, n_head=4, n_kv_head=2, mlp_mult=2.0,
        seq_len=512, batch_size=8, max_steps=1_000_000, max_seconds=900.0, warmup_steps=20,
        warmdown_frac=0.3, log_every=25, val_every=250, val_tokens=131072, ckpt_every=100, device="cpu",
        out="runs/cpu-small",
    ),
    # the parameter-golf baseline shape (17M parameters): CUDA, bf16, 524,288 tokens per step, 10 minutes
    "golf": dict(
        vocab_size=1024, n_layer=9, n_embd=512, n_head=8, n_kv_head=4, mlp_mult=2.0, unet_skips=True,
        seq_len=1024, batch_size=64, global_batch_tokens=524_288, max_steps=20_000, max_seconds=600.0,
        warmup_steps=20, warmdown_frac=0.2, matrix_lr=0.04, embed_lr=0.05, scalar_lr=0.04,
        muon_momentum_warmup=500, log_every=100, val_every=1000, val_tokens=0, val_batch_size=32,
        ckpt_every=1000, device="cuda", compile=True, out="runs/golf",
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset_config(name: str) -> TrainConfig:
    """The TrainConfig a preset describes (unknown names list the known ones)."""
    if name not in PRESETS:
        raise QpackInputError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    return with_values(TrainConfig(), PRESETS[name])

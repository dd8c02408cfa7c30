"""Two CPU processes (gloo) train together: the replicas stay identical and match one process on the same tokens."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from qpack.models.gpt import GPT
from trainers.gpt.train import Trainer, TrainConfig, read_metrics, with_values

VOCAB = 40
STEPS = 6


def _write_shard(path: Path, tokens) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def _config(data: Path, out: Path, batch_size: int) -> TrainConfig:
    return with_values(TrainConfig(), dict(
        data=str(data), out=str(out), vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, seq_len=16,
        batch_size=batch_size, max_steps=STEPS, warmup_steps=2, log_every=1, ckpt_every=0, val_tokens=128,
        threads=1, device="cpu", ema_decay=0.5))


def _worker(rank: int, world: int, port: int, data: str, out: str, result: str) -> None:
    # the variables torchrun sets
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(_config(Path(data), Path(out), batch_size=2), log=lambda line: None)
    trainer.run()
    torch.save(trainer.raw.state_dict(), Path(result) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_stay_identical_and_match_one_process(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    rng = np.random.default_rng(1)
    _write_shard(data / "toy_train_000000.bin", rng.integers(0, VOCAB, size=3000))  # random: ranks' grads differ
    _write_shard(data / "toy_val_000000.bin", rng.integers(0, VOCAB, size=300))
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(tmp_path / "ddp"), str(tmp_path)), nprocs=2, join=True)

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(r0) == set(r1)
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "replicas diverged"
    final = torch.load(tmp_path / "ddp" / "final.pt", weights_only=True)["model"]  # rank 0 wrote it (EMA weights)
    assert all(torch.equal(final[k], r0[k]) for k in r0)

    # one process with twice the batch sees exactly the tokens of both ranks, so it takes the same steps
    torch.set_num_threads(1)
    single = Trainer(_config(data, tmp_path / "single", batch_size=4), log=lambda line: None)
    single.run()
    one = single.raw.state_dict()
    torch.manual_seed(single.cfg.seed)  # the trainer seeds model init the same way
    start = GPT(single.cfg.model).state_dict()
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-2  # training really changed the weights
    for k in one:
        torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=1e-5)
    ddp_losses = [m["loss"] for m in read_metrics(tmp_path / "ddp") if "loss" in m]
    one_losses = [m["loss"] for m in read_metrics(tmp_path / "single") if "loss" in m]
    np.testing.assert_allclose(ddp_losses, one_losses, rtol=1e-5)

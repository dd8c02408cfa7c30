"""torch.distributed for qpack's own multi-process work: join the group torchrun describes, and gather results.

qpack never starts processes itself: `torchrun --nproc_per_node=N -m qpack.cli eval ...` sets RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT, and `join` reads them. CUDA ranks use NCCL on device LOCAL_RANK, CPU ranks gloo.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import QpackInputError

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Group:
    """This process's place in the default process group."""

    rank: int
    world: int
    device: str  # the device this rank computes on ("cpu" or "cuda:LOCAL_RANK")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment describes a group of more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def current() -> Group | None:
    """The group this process already belongs to (someone else called init_process_group), or None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    device = "cpu"
    if dist.get_backend() == "nccl":
        device = f"cuda:{torch.cuda.current_device()}"
    return Group(dist.get_rank(), dist.get_world_size(), device)


def join(device: str) -> Group:
    """Join (or reuse) the default process group from torchrun's environment variables; `device` is cpu or cuda."""
    import torch.distributed as dist

    group = current()
    if group is not None:
        return group
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise QpackInputError(f"--distributed: {', '.join(missing)} not set; launch with "
                              "torchrun --nproc_per_node=N -m qpack.cli eval ...")
    if not dist.is_available():
        raise QpackInputError("--distributed: this torch build has no torch.distributed")
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise QpackInputError(f"--distributed: LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return current()


def gather_to_main(values: np.ndarray, group: Group) -> list[np.ndarray] | None:
    """Every rank's float64 array, in rank order, on rank 0 (None elsewhere); sizes may differ between ranks."""
    import torch.distributed as dist

    comm = torch.device(group.device)
    local = torch.as_tensor(np.ascontiguousarray(values, dtype=np.float64)).to(comm)
    sizes = [torch.zeros(1, dtype=torch.long, device=comm) for _ in range(group.world)]
    dist.all_gather(sizes, torch.tensor([local.numel()], dtype=torch.long, device=comm))
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.float64, device=comm)
    padded[: local.numel()] = local
    bufs = [torch.zeros(longest, dtype=torch.float64, device=comm) for _ in range(group.world)] if group.is_main else None
    dist.gather(padded, bufs, dst=0)
    if not group.is_main:
        return None
    return [b[: int(s.item())].cpu().numpy() for b, s in zip(bufs, sizes)]


def barrier() -> None:
    """Wait for every rank (no-op outside a group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()

"""Data-free sensitivity: how the budget solver weighs one tensor's quantization error when no calibration data
(so no Hessian) is given.

  * "mse": 0.5 * ||W - Wq||^2, the raw squared error; tensors of large weights dominate it, so the solver
    starves small-weight tensors that matter as much to the model's output.
  * "relative": the squared error over the block's mean square weight, 0.5 * ||W - Wq||^2 /
    mean(W^2) = 0.5 * numel * ||W - Wq||^2 / ||W||^2: every parameter's error in units of its own tensor's
    scale, i.e. the output error of a linear layer relative to its output energy for white inputs, counted
    per parameter. It allocates like SDClip (one step in units of each row's spread) but lets the solver
    trade where that pays.
  * "relative+embed" (the default): "relative" with the token embedding / output head (names matching EMBED_NAME) weighted
    EMBED_WEIGHT times: its error reaches every logit (tied) or every token's input, where a block matrix's
    is one of 2L residual contributions; the records give it int8 against int6 matrices for that reason.
"""
from __future__ import annotations

import re

import torch

from ..errors import QpackInputError
from .base import as_matrix

DATAFREE_LOSSES = ("relative", "relative+embed", "mse")
EMBED_NAME = re.compile(r"(emb|wte|lm_head)", re.I)
EMBED_WEIGHT = 32.0
DEFAULT_DATAFREE_LOSS = "relative+embed"


def check_datafree_loss(mode: str) -> str:
    """`mode` if it names a data-free loss, else a QpackInputError."""
    if mode not in DATAFREE_LOSSES:
        raise QpackInputError(f"data-free loss must be one of {', '.join(DATAFREE_LOSSES)}, got {mode!r}")
    return mode


def datafree_weight(w: torch.Tensor, mode: str, name: str = "") -> float:
    """The factor on 0.5 * squared error for a block of weights `w` (of the tensor `name`) under `mode`."""
    if check_datafree_loss(mode) == "mse":
        return 1.0
    ms = float(as_matrix(w).to(torch.float64).square().mean())
    role = EMBED_WEIGHT if mode == "relative+embed" and EMBED_NAME.search(name) else 1.0
    return role / ms if ms > 0 else role


def datafree_loss(w: torch.Tensor, wq: torch.Tensor, mode: str, name: str = "") -> float:
    """The solver's loss for replacing the block `w` (of the tensor `name`) by `wq` with no data."""
    e = (as_matrix(w).to(torch.float64) - as_matrix(wq).to(torch.float64)).square().sum()
    return 0.5 * float(e) * datafree_weight(w, mode, name)

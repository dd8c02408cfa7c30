"""Muon (momentum orthogonalized by a Newton-Schulz iteration) for the blocks' matrices; Adam for the rest.

Under DDP the gradients are already averaged across ranks when step() runs, so every rank computes the same
update and the replicas stay identical without any communication here.
"""
from __future__ import annotations

import torch
import torch.nn as nn

# quintic iteration coefficients chosen (Keller Jordan's Muon) to push singular values towards 1 quickly
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, by a Newton-Schulz iteration (bf16 on CUDA, fp32 elsewhere)."""
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix x x^T is then the smaller one
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.T
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalized per 2-D parameter, plus decoupled decay."""

    def __init__(self, params, lr: float = 0.04, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(mom).add_(p.grad)
                g = p.grad.add(buf, alpha=mom) if group["nesterov"] else buf
                update = orthogonalize(g, group["ns_steps"])
                # an orthogonal update has RMS 1/sqrt(max dim); this rescales tall matrices to match wide ones
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1.0 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * scale)
        return loss


def split_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters by optimizer role: 'matrix' (2-D, inside blocks: Muon), 'embed', 'head', 'scalar' (Adam)."""
    groups: dict[str, list[nn.Parameter]] = {"matrix": [], "embed": [], "head": [], "scalar": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("blocks.") and p.ndim == 2:
            groups["matrix"].append(p)
        elif name.endswith("_emb.weight"):
            groups["embed"].append(p)
        elif name.startswith("lm_head."):
            groups["head"].append(p)
        else:  # gains, per-head scalars, skip weights, the bigram projection
            groups["scalar"].append(p)
    return groups

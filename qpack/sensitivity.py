"""Sensitivity of the model's loss to each weight: the diagonal Fisher, F = mean over batches of (d loss / d w)^2.

Layer-local Hessians X^T X say how a layer's *output* moves, not how the model's loss does, so they cannot be
compared across layers. The Fisher comes from the model's own loss on the calibration tokens, so
0.5 * sum(F * (w - wq)^2) estimates the loss increase of quantizing any weight on one common scale.

Each batch is one sample of the gradient: callers that want the classic per-sample estimate give batches of
one row (qpack.calibrate.fisher does by default). Memory: one fp32 tensor per weight tracked, on its device.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from .errors import QpackInputError
from .forward import ForwardAdapter, call_user

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, token rows on its device) -> scalar loss
ParamFilter = Callable[[str, torch.Tensor], bool]


def is_tracked(name: str, p: torch.Tensor) -> bool:
    """The weights that get a Fisher by default: floating parameters of 2+ dims (what compress may quantize)."""
    return p.is_floating_point() and p.ndim >= 2


def next_token_loss(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V] at positions 0..T-2 against the next tokens rows[:, 1:]."""
    if logits.shape[1] < 2:
        raise QpackInputError("Fisher sensitivity needs calibration rows of at least 2 tokens")
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), rows[:, 1:].reshape(-1))


def model_loss(adapter: ForwardAdapter) -> LossFn:
    """The model's own loss on one batch of rows, by the calling convention qpack.forward found.

    A model called with targets returns its loss (rows carry one extra token); otherwise the logits of
    `forward(model, rows)` or `model(rows)` are scored against the next token inside each row.
    """
    def loss(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        if adapter.with_targets:
            out = adapter.run(model, rows)
            if not isinstance(out, torch.Tensor) or out.numel() != 1 or not out.is_floating_point():
                got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
                raise QpackInputError(f"{adapter.model_name}.forward(input_ids, target_ids) returned {got}; "
                                      "Fisher sensitivity needs it to return the scalar loss")
            return out.reshape(())
        if adapter.forward is None and not adapter.has_forward_logits:
            out = adapter.run(model, rows)  # model(rows): must be logits
            if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(rows.shape):
                got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
                raise QpackInputError(f"{adapter.model_name}.forward(input_ids) returned {got}; Fisher sensitivity "
                                      "needs logits [B, T, vocab]: pass --forward module:function")
            return next_token_loss(out, rows)
        return next_token_loss(adapter.logits(model, rows), rows)

    return loss


def _tracked(model: nn.Module, keep: ParamFilter) -> tuple[dict[int, list[str]], dict[int, nn.Parameter]]:
    """Every state-dict name of each tensor (tied weights: several), and the tracked parameters by id."""
    names_of: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(t), []).append(key)
    for key, p in model.named_parameters(remove_duplicate=True):
        if id(p) in names_of and keep(key, p):
            params[id(p)] = p
    if not params:
        raise QpackInputError("sensitivity: the model has no floating matrix parameter")
    return names_of, params


def fisher_sums(model: nn.Module, batches: Iterable[torch.Tensor], loss_fn: LossFn,
                keep: ParamFilter = is_tracked, progress: bool = False) -> list[tuple[list[str], torch.Tensor, int]]:
    """Unsummed form of fisher_diagonal: (state-dict names, sum over batches of grad^2, batches) per tracked
    parameter, in state-dict order, so that processes can all-reduce before dividing."""
    names_of, params = _tracked(model, keep)
    ids = list(params)
    sums = {pid: torch.zeros(params[pid].shape, dtype=torch.float32, device=params[pid].device) for pid in ids}
    device = params[ids[0]].device
    flags = {pid: params[pid].requires_grad for pid in ids}
    was_training = model.training
    model.eval()  # dropout off: the gradient of the loss the model is scored with
    n = 0
    it: Iterable[torch.Tensor] = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="fisher", unit="batch", leave=False)
    try:
        for pid in ids:
            params[pid].requires_grad_(True)
        with torch.enable_grad():
            for batch in it:
                loss = loss_fn(model, batch.to(device))
                if not torch.isfinite(loss.detach()):
                    raise QpackInputError(f"Fisher sensitivity: the model's loss is {float(loss)} on a calibration "
                                          "batch")
                weights = [params[pid] for pid in ids]
                grads = call_user(f"{type(model).__name__} backward on the calibration tokens",
                                  lambda: torch.autograd.grad(loss, weights, allow_unused=True))
                for pid, g in zip(ids, grads):
                    if g is not None:  # an unused weight: its gradient is zero
                        sums[pid].add_(g.detach().float().square())
                n += 1
    finally:
        for pid in ids:
            params[pid].requires_grad_(flags[pid])
        model.train(was_training)
    order = {pid: i for i, pid in enumerate(names_of)}
    return [(names_of[pid], sums[pid], n) for pid in sorted(ids, key=order.__getitem__)]


def fisher_diagonal(model: nn.Module, batches: Iterable[torch.Tensor], loss_fn: LossFn,
                    keep: ParamFilter = is_tracked, progress: bool = False) -> dict[str, torch.Tensor]:
    """{state-dict name: mean over batches of (d loss_b / d w)^2} for every tracked parameter (a tied weight:
    one tensor under each of its names), fp32 on the parameter's device."""
    return from_sums(fisher_sums(model, batches, loss_fn, keep, progress))


def from_sums(groups: list[tuple[list[str], torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Divide fisher_sums' sums by their batch counts and key them by every state-dict name."""
    out: dict[str, torch.Tensor] = {}
    for names, s, n in groups:
        if n == 0:
            raise QpackInputError("Fisher sensitivity got no calibration batches")
        f = s.div_(n)
        for key in names:
            out[key] = f
    return out


def probe_sensitivity(model: nn.Module, batches: Iterable[torch.Tensor], loss_fn: LossFn,
                      quantize: Callable[[torch.Tensor], torch.Tensor], keep: ParamFilter = is_tracked,
                      floor: float = 0.01, progress: bool = False) -> dict[str, torch.Tensor]:
    """Measured sensitivity per tensor at one probe step, in the Fisher's form (compress(fisher=...) takes it).

    Each tracked weight in turn is replaced by quantize(w) and the mean loss over `batches` measured against the
    unquantized one (same batches: a paired difference); s = 2 * (loss_q - loss) / ||w - quantize(w)||^2 is stored
    as a constant tensor of the weight's shape, so 0.5 * sum(s * E^2) reproduces the measured increase at the
    probe. An increase at or below zero (noise, or a weight the loss ignores) is raised to `floor` times the
    median positive s, so that no tensor becomes free to destroy.
    """
    names_of, params = _tracked(model, keep)
    batches = list(batches)
    if not batches:
        raise QpackInputError("probe sensitivity got no calibration batches")
    device = next(iter(params.values())).device
    batches = [b.to(device) for b in batches]
    was_training = model.training
    model.eval()

    def mean_loss() -> float:
        return sum(float(loss_fn(model, b)) for b in batches) / len(batches)

    order = {pid: i for i, pid in enumerate(names_of)}
    ids = sorted(params, key=order.__getitem__)
    raw: dict[int, float] = {}
    it: Iterable[int] = ids
    if progress:
        from tqdm import tqdm

        it = tqdm(ids, desc="probe", unit="tensor", leave=False)
    try:
        with torch.no_grad():
            base = mean_loss()
            for pid in it:
                p = params[pid]
                saved = p.detach().clone()
                q = quantize(saved.float()).reshape(saved.shape).to(saved.dtype)
                err = float((saved.double() - q.double()).square().sum())
                p.copy_(q)
                try:
                    increase = mean_loss() - base
                finally:
                    p.copy_(saved)
                raw[pid] = 2 * increase / err if err > 0 else 0.0
    finally:
        model.train(was_training)
    positive = sorted(v for v in raw.values() if v > 0)
    least = floor * positive[len(positive) // 2] if positive else 1.0
    out: dict[str, torch.Tensor] = {}
    for pid in ids:
        s = torch.tensor(max(raw[pid], least), dtype=torch.float32).expand(params[pid].shape)  # no copy per weight
        for key in names_of[pid]:
            out[key] = s
    return out


def fisher_weighted_loss(w: torch.Tensor, wq: torch.Tensor, fisher: torch.Tensor) -> float:
    """0.5 * sum(F * (w - wq)^2): the loss increase the diagonal Fisher predicts for replacing w by wq."""
    if tuple(fisher.shape) != tuple(w.shape):
        raise QpackInputError(f"Fisher of shape {tuple(fisher.shape)} does not match a weight of {tuple(w.shape)}")
    e = (w.detach().to(torch.float64) - wq.detach().to(torch.float64).reshape(w.shape)).square()
    return float((e * fisher.detach().to(torch.float64)).sum() / 2)


def kron_weighted_loss(w: torch.Tensor, wq: torch.Tensor, fisher: torch.Tensor, hessian: torch.Tensor) -> float:
    """0.5 * sum_r a_r * e_r^T H e_r with a_r = sum_j F_rj / tr(H): the diagonal Fisher's row scale times the input
    Hessian (a Kronecker-factored Fisher), so errors that GPTQ correlated across columns are priced as the layer's
    output sees them. For errors uncorrelated across columns it equals fisher_weighted_loss on average."""
    rows = w.shape[0]
    F = fisher.detach().to(torch.float64).reshape(rows, -1)
    E = (w.detach().to(torch.float64) - wq.detach().to(torch.float64).reshape(w.shape)).reshape(rows, -1)
    H = hessian.detach().to(device=E.device, dtype=torch.float64)
    if tuple(H.shape) != (E.shape[1], E.shape[1]) or tuple(F.shape) != tuple(E.shape):
        raise QpackInputError(f"Kronecker loss: Fisher {tuple(fisher.shape)} and Hessian {tuple(hessian.shape)} do "
                              f"not match a weight of {tuple(w.shape)}")
    tr = float(torch.diagonal(H).sum())
    if not tr > 0:
        return fisher_weighted_loss(w, wq, fisher)
    a = F.sum(dim=1) / tr
    return float((a * ((E @ H) * E).sum(dim=1)).sum() / 2)


def check_fisher(fisher: dict[str, Any], sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fisher tensors for a state dict, in fp32 on each weight's device; refuses unknown names, wrong shapes and
    negative or non-finite values."""
    out: dict[str, torch.Tensor] = {}
    for name, f in fisher.items():
        if name not in sd:
            raise QpackInputError(f"Fisher given for {name!r}, which the state dict does not hold")
        if not isinstance(f, torch.Tensor) or tuple(f.shape) != tuple(sd[name].shape):
            got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise QpackInputError(f"Fisher for {name!r} is {got}, the weight is {tuple(sd[name].shape)}")
        f = f.detach().to(sd[name].device, torch.float32)
        if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise QpackInputError(f"Fisher for {name!r} holds negative or non-finite values")
        out[name] = f
    return out

"""Passthrough tuning: after quantization, fit the tensors stored unquantized (norm gains, residual and attention
scales, small vectors) so the quantized model's next-token distribution matches the float model's.

Those tensors are stored in the artifact anyway, as fp16, so changing their values costs no bytes, yet they sit on
every path the quantization error takes: a gain after a quantized matrix can undo its error's mean scale, a
residual scale can rebalance a branch. The objective is the KL divergence from the float model (the teacher,
the model as given) to the quantized one, per token, on the calibration rows: distillation, not the next-token
loss, which on 16k calibration tokens overfits them (measured: cpu-small2 at 3 bits/param, val_bpb 1.9658 ->
1.9650 with the KL, -> 1.9672 with the loss). A quarter of the rows is held out: the epoch with the lowest
held-out KL is kept, and the tensors stay as they were when no epoch beats the start.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import QpackInputError
from .forward import ForwardAdapter, call_user

DEFAULT_EPOCHS = 4
DEFAULT_LR = 3e-3
HOLDOUT = 0.25  # share of the calibration batches kept out of training, to choose the epoch
CACHE_BYTES = 1 << 28  # the teacher's log-probabilities are kept in memory up to this size, else recomputed


@dataclass
class TuneReport:
    """What tuning did: the tuned values (empty: nothing changed) and the held-out KL (nats per token)."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    kl_before: float = math.nan
    kl_after: float = math.nan
    epoch: int = 0  # the epoch kept (0: none)
    epochs: int = 0
    tensors: int = 0  # tensors trained

    def as_dict(self) -> dict:
        return {"tensors": self.tensors, "changed": len(self.values), "epochs": self.epochs, "epoch_kept": self.epoch,
                "heldout_kl_before": self.kl_before, "heldout_kl_after": self.kl_after}


#: (dequantized state dict, names that may change) -> TuneReport; what compress(tune=...) calls
Tuner = Callable[[Mapping[str, torch.Tensor], Sequence[str]], TuneReport]


def _check(epochs: int, lr: float) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise QpackInputError(f"tune epochs must be an integer >= 0, got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise QpackInputError(f"tune learning rate must be a positive number, got {lr!r}")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """The model in eval mode (dropout off: the teacher as it would be scored), its own mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class PassthroughTuner:
    """A Tuner for one float model (the teacher) and its calibration batches; `__call__` tunes a quantized copy."""

    def __init__(self, model: nn.Module, batches: Sequence[torch.Tensor], adapter: ForwardAdapter,
                 epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR, progress: bool = False):
        _check(epochs, lr)
        adapter.check_logits()  # the KL needs logits: a forward that only returns a loss cannot be tuned
        if not batches:
            raise QpackInputError("passthrough tuning got no calibration batches")
        self.model, self.adapter, self.epochs, self.lr, self.progress = model, adapter, epochs, float(lr), progress
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        # rows carry one extra token for a model called with targets; the logits come from the inputs alone
        inputs = [b[:, :-1] if adapter.with_targets else b for b in batches]
        n_hold = max(1, round(len(inputs) * HOLDOUT)) if len(inputs) > 1 else 0
        self.train_rows = inputs[: len(inputs) - n_hold]
        self.held_rows = inputs[len(inputs) - n_hold:] or inputs  # one batch: select on the training batch
        self._teacher: dict[int, torch.Tensor] | None = None
        self._check_gradient()

    def _check_gradient(self) -> None:
        """Refuse a model whose logits carry no gradient (a forward that detaches them) before compress runs."""
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad(), _eval_mode(self.model):
                logits = self.adapter.logits(self.model, self.held_rows[0][:1].to(self.device))
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        if not logits.requires_grad:
            raise QpackInputError(f"{self.adapter.model_name}'s logits carry no gradient, so nothing can be tuned "
                                  "against them")

    def _logprobs(self, model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.adapter.logits(model, rows.to(self.device)).float(), dim=-1)

    def _teacher_lp(self, i: int, rows: torch.Tensor) -> torch.Tensor:
        if self._teacher is not None and i in self._teacher:
            return self._teacher[i]
        with torch.no_grad(), _eval_mode(self.model):
            lp = self._logprobs(self.model, rows)
        if self._teacher is None:
            per = lp.numel() * lp.element_size()
            self._teacher = {} if per * (len(self.train_rows) + len(self.held_rows)) <= CACHE_BYTES else None
        if self._teacher is not None:
            self._teacher[i] = lp
        return lp

    @staticmethod
    def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) per token, averaged."""
        return (teacher.exp() * (teacher - student)).sum(-1).mean()

    def _heldout(self, student: nn.Module) -> float:
        total = 0.0
        with torch.no_grad():
            for j, rows in enumerate(self.held_rows):
                total += float(self._kl(self._teacher_lp(-1 - j, rows), self._logprobs(student, rows)))
        return total / len(self.held_rows)

    def __call__(self, state: Mapping[str, torch.Tensor], names: Sequence[str]) -> TuneReport:
        """Tune the float32 parameters among `names` of a copy of the model holding `state` (the dequantized
        artifact); returns their tuned values, or none when no epoch lowered the held-out KL."""
        student = copy.deepcopy(self.model)
        own = student.state_dict(keep_vars=True)
        missing = [n for n in state if n not in own]
        if missing:
            raise QpackInputError(f"passthrough tuning: the model has no tensor named {missing[0]!r}")
        with torch.no_grad():
            for n, t in state.items():
                own[n].copy_(t.to(device=own[n].device, dtype=own[n].dtype).reshape(own[n].shape))
        params = dict(student.named_parameters(remove_duplicate=False))
        train = {n: params[n] for n in names if n in params and params[n].dtype == torch.float32}
        report = TuneReport(epochs=self.epochs, tensors=len(train))
        if not train or self.epochs == 0:
            return report
        for p in student.parameters():
            p.requires_grad_(False)
        unique = list({id(p): p for p in train.values()}.values())
        for p in unique:
            p.requires_grad_(True)
        student.eval()  # dropout off: the model as it will be scored
        opt = torch.optim.Adam(unique, lr=self.lr)
        best = report.kl_before = self._heldout(student)
        best_values: dict[str, torch.Tensor] = {}
        epochs = range(self.epochs)
        if self.progress:
            from tqdm import tqdm

            epochs = tqdm(epochs, desc="tune", unit="epoch", leave=False)
        for epoch in epochs:
            with torch.enable_grad():
                for i, rows in enumerate(self.train_rows):
                    loss = self._kl(self._teacher_lp(i, rows), self._logprobs(student, rows))
                    opt.zero_grad(set_to_none=True)
                    call_user(f"{self.adapter.model_name} backward while tuning", loss.backward)
                    opt.step()
            kl = self._heldout(student)
            if kl < best:
                best, report.epoch = kl, epoch + 1
                best_values = {n: p.detach().clone() for n, p in train.items()}
        report.kl_after = best
        report.values = best_values
        return report


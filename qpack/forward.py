"""How qpack calls a user's model: one adapter for calibration (run it on tokens) and eval (get logits).

Rules, in order:
- a `forward` function (`--forward module:function`, or a callable in Python) is called as
  `forward(model, input_ids) -> logits [B, T, V]`, for calibration and eval alike;
- eval scores a model that has `forward_logits(input_ids)` through it;
- a model whose `forward` needs a second positional argument (the seeds' `forward(input_ids, target_ids) -> loss`)
  is calibrated as `model(rows[:, :-1], rows[:, 1:])` on rows of seq_len + 1 tokens; eval needs `forward_logits`
  or `--forward` for it, since its forward returns a loss and not logits;
- anything else is called as `model(input_ids)`.
Any exception raised inside the user's code becomes one QpackInputError naming the model class and the call.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import QpackError, QpackInputError

ForwardFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, input_ids [B, T]) -> logits [B, T, V]


def load_forward(forward: str | ForwardFn | None) -> ForwardFn | None:
    """A forward function from a `module:function` string (imported: a person typed it) or a callable."""
    if forward is None or callable(forward):
        return forward
    from .models import load_model_factory

    return load_model_factory(forward, flag="--forward")


def needs_targets(model: nn.Module) -> bool:
    """True when `model.forward` requires a second positional argument (targets), as the seeds' GPT does."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return False
    required = [p for p in sig.parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 2


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape))


def call_user(what: str, fn: Callable[[], Any]) -> Any:
    """Run user code; its failures become one line that names the call (qpack's own errors pass unchanged)."""
    try:
        return fn()
    except QpackError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise QpackInputError(f"{what} ran out of GPU memory; use fewer tokens per batch") from None
    except Exception as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:300]
        raise QpackInputError(f"{what} failed: {type(exc).__name__}: {detail}") from None


@dataclass(frozen=True)
class ForwardAdapter:
    """The calling convention of one model class: `run` for calibration, `logits` for eval."""

    model_name: str
    forward: ForwardFn | None = None  # the user's function, when given
    with_targets: bool = False  # calibration rows carry one extra token: (inputs, targets) = (rows[:, :-1], rows[:, 1:])
    has_forward_logits: bool = False

    @property
    def extra_tokens(self) -> int:
        """Tokens a calibration row holds beyond seq_len (1 when the model is called with targets)."""
        return 1 if self.with_targets else 0

    def run(self, model: nn.Module, rows: torch.Tensor) -> Any:
        """One calibration forward on token rows [B, seq_len + extra_tokens]; the result is discarded by callers."""
        if self.forward is not None:
            fn = self.forward
            return call_user(f"--forward {_name(fn)}(model, input_ids[{_shape(rows)}]) on {self.model_name}",
                         lambda: fn(model, rows))
        if self.with_targets:
            x, y = rows[:, :-1], rows[:, 1:]
            return call_user(f"{self.model_name}.forward(input_ids[{_shape(x)}], target_ids[{_shape(y)}]) "
                         "on the calibration tokens", lambda: model(x, y))
        return call_user(f"{self.model_name}.forward(input_ids[{_shape(rows)}]) on the calibration tokens",
                     lambda: model(rows))

    def check_logits(self) -> None:
        """Raise QpackInputError when this model cannot give logits (forward needs targets, no forward_logits)."""
        if self.forward is None and not self.has_forward_logits and self.with_targets:
            raise QpackInputError(f"{self.model_name}.forward needs target ids and returns a loss, and the model has "
                                  "no forward_logits(input_ids): pass --forward module:function, a function "
                                  "(model, input_ids) -> logits [B, T, vocab]")

    def logits(self, model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for input ids [B, T]."""
        self.check_logits()
        if self.forward is not None:
            fn = self.forward
            what = f"--forward {_name(fn)}(model, input_ids[{_shape(idx)}]) on {self.model_name}"
            out = call_user(what, lambda: fn(model, idx))
        elif self.has_forward_logits:
            what = f"{self.model_name}.forward_logits(input_ids[{_shape(idx)}])"
            out = call_user(what, lambda: model.forward_logits(idx))
        else:
            what = f"{self.model_name}.forward(input_ids[{_shape(idx)}])"
            out = call_user(what, lambda: model(idx))
        if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(idx.shape):
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise QpackInputError(f"{what} returned {got}; eval needs logits [B, T, vocab] = "
                                  f"[{idx.shape[0]}, {idx.shape[1]}, V]")
        return out


def _name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def adapter_for(model: nn.Module, forward: str | ForwardFn | None = None) -> ForwardAdapter:
    """The adapter for `model`, with an optional `forward` override (callable or `module:function`)."""
    fn = load_forward(forward)
    return ForwardAdapter(model_name=type(model).__name__, forward=fn, with_targets=fn is None and needs_targets(model),
                          has_forward_logits=callable(getattr(model, "forward_logits", None)))


class LogitsModule(nn.Module):
    """Wraps a user's model so that `wrapper(input_ids)` returns logits: sliding, mixer and TTT use it unchanged.

    The user's model is the submodule `inner`; its parameters (and their block indices) stay visible to TTT.
    """

    def __init__(self, inner: nn.Module, adapter: ForwardAdapter):
        super().__init__()
        adapter.check_logits()
        self.inner = inner
        self.adapter = adapter

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.adapter.logits(self.inner, idx)


def logits_module(model: nn.Module, forward: str | ForwardFn | None = None) -> LogitsModule:
    """`model` wrapped so that calling it on input ids gives logits, with the user's errors made one line."""
    return LogitsModule(model, adapter_for(model, forward))

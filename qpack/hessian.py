"""Hessians of linear layers' inputs, H = X^T X / n, collected with forward hooks on any nn.Module.

Results are keyed by the state-dict name of each weight. Every nn.Linear (subclasses included) is hooked.
A 2-D parameter that no hooked Linear owns but that the forward pass uses through F.linear (a head tied to
the token embedding as `F.linear(norm(x), tok_emb.weight)`) is caught too, by a torch function mode that
watches F.linear calls for that exact parameter. A weight shared by several modules (an lm_head tied to the
token embedding) gets one Hessian, from the inputs of every use as a linear weight (for the head: the final
norm's output), stored under every state-dict name of that parameter. An embedding used only for lookups
gets none: its input is a token id, not a vector.
"""
from __future__ import annotations

from typing import Any, Callable, Collection, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .errors import QpackInputError

ModuleFilter = Callable[[str, nn.Module], bool]
RunFn = Callable[[nn.Module, torch.Tensor], Any]  # (model, batch on the model's device) -> ignored


def _plain_call(model: nn.Module, batch: torch.Tensor) -> Any:
    return model(batch)


def _selected(modules: ModuleFilter | Collection[str] | None) -> ModuleFilter:
    if modules is None:
        return lambda name, mod: True
    if callable(modules):
        return modules
    names = set(modules)
    return lambda name, mod: name in names


class _Accumulator:
    """Running sum of X^T X and row count for one weight, updated in place by hooks."""

    def __init__(self, cols: int, dtype: torch.dtype, device: torch.device):
        self.H = torch.zeros(cols, cols, dtype=dtype, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.dtype)
        self.H.addmm_(x.T, x)
        self.n += x.shape[0]


class _FunctionalLinears(TorchFunctionMode):
    """Accumulates the input of F.linear calls whose weight is one of the watched parameters."""

    def __init__(self, watched: dict[int, _Accumulator]):
        super().__init__()
        self.watched = watched

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            acc = self.watched.get(id(weight))
            if acc is not None:
                acc.add(args[0] if args else kwargs["input"])
        return func(*args, **kwargs)


def collect_hessians(model: nn.Module, batches: Iterable[torch.Tensor],
                     modules: ModuleFilter | Collection[str] | None = None, progress: bool = False,
                     dtype: torch.dtype = torch.float32,
                     inputs: Mapping[str, nn.Module] | None = None,
                     run: RunFn | None = None) -> dict[str, torch.Tensor]:
    """Run `batches` through `model`; return {weight state-dict name: X^T X / n} for every selected nn.Linear
    and every parameter used directly as an F.linear weight.

    `modules` selects by the qualified name of the module owning the weight (a predicate (name, module) ->
    bool, or a set of names). `inputs` maps weight names to a module whose *output* is that weight's input,
    for weights used some other way (e.g. `x @ W.T`); it replaces the automatic capture for those weights.
    `run(model, batch)` makes one forward call (default `model(batch)`; see qpack.forward for other conventions).
    """
    out: dict[str, torch.Tensor] = {}
    for names, H, n in hessian_sums(model, batches, modules, progress, dtype, inputs, run):
        if n == 0:
            continue  # a layer the batches never reached: no Hessian rather than a zero one
        H = H.div_(n)
        for key in names:
            out[key] = H
    return out


def hessian_sums(model: nn.Module, batches: Iterable[torch.Tensor],
                 modules: ModuleFilter | Collection[str] | None = None, progress: bool = False,
                 dtype: torch.dtype = torch.float32, inputs: Mapping[str, nn.Module] | None = None,
                 run: RunFn | None = None) -> list[tuple[list[str], torch.Tensor, int]]:
    """Unnormalized (state-dict names, sum of X^T X, rows) per weight, in state-dict order, unreached ones
    included with n = 0: the form that can be summed across processes before dividing."""
    keep = _selected(modules)
    state = model.state_dict(keep_vars=True)
    names_of: dict[int, list[str]] = {}
    for key, t in state.items():
        names_of.setdefault(id(t), []).append(key)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    accs: dict[int, _Accumulator] = {}
    hooks = []

    def hook_input(param: torch.Tensor, cols: int, use_output: bool):
        acc = accs.setdefault(id(param), _Accumulator(cols, dtype, device))
        if use_output:
            return lambda mod, args, kwargs, out: acc.add(out)
        return lambda mod, args, kwargs, out: acc.add(args[0] if args else kwargs["input"])

    try:
        owners: dict[int, tuple[str, nn.Module]] = {}
        for name, mod in model.named_modules():
            for p in mod.parameters(recurse=False):
                owners.setdefault(id(p), (name, mod))
            if isinstance(mod, nn.Linear) and keep(name, mod) and id(mod.weight) in names_of:
                hooks.append(mod.register_forward_hook(hook_input(mod.weight, mod.in_features, False),
                                                       with_kwargs=True))
        for wname, mod in (inputs or {}).items():
            if wname not in state:
                raise QpackInputError(f"hessian: the model has no weight named {wname!r}")
            w = state[wname]
            if w.ndim != 2:
                raise QpackInputError(f"hessian: {wname!r} is not a matrix (shape {tuple(w.shape)})")
            hooks.append(mod.register_forward_hook(hook_input(w, w.shape[1], True), with_kwargs=True))
        # Parameters used as F.linear weights outside any hooked module (hand-tied heads).
        hooked = set(accs)
        functional = {pid: _Accumulator(t.shape[1], dtype, device) for pid, t in
                      ((id(t), t) for t in state.values() if isinstance(t, nn.Parameter) and t.ndim == 2)
                      if pid not in hooked and pid in owners and keep(*owners[pid])}
        accs.update(functional)
        if not hooks and not functional:
            raise QpackInputError("hessian: the model has no nn.Linear layer to collect Hessians for")
        with _FunctionalLinears(functional):
            _run(model, batches, device, progress, run or _plain_call)
    finally:
        for h in hooks:
            h.remove()
    # state-dict order, so that every process of a distributed run lists the weights identically
    order = {pid: i for i, pid in enumerate(names_of)}
    return [(names_of[pid], accs[pid].H, accs[pid].n) for pid in sorted(accs, key=order.__getitem__)]


def _run(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device, progress: bool,
         run: RunFn) -> None:
    """Forward every batch once in eval mode without gradients, restoring the model's mode afterwards."""
    was_training = model.training
    model.eval()
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="hessians", unit="batch", leave=False)
    try:
        with torch.no_grad():
            for batch in it:
                run(model, batch.to(device))
    finally:
        model.train(was_training)


def calibration_batches(tokens: np.ndarray, n_tokens: int, seq_len: int, batch_size: int) -> list[torch.LongTensor]:
    """Deterministic calibration batches: n_tokens // seq_len windows of seq_len tokens spread evenly over
    `tokens`, grouped into LongTensors of up to batch_size rows."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise QpackInputError(f"calibration tokens must be a 1-D array, got shape {tokens.shape}")
    if seq_len < 1 or batch_size < 1 or n_tokens < 1:
        raise QpackInputError("calibration: n_tokens, seq_len and batch_size must be positive")
    if len(tokens) < seq_len:
        raise QpackInputError(f"calibration needs at least seq_len={seq_len} tokens, got {len(tokens)}")
    n_seq = max(1, min(n_tokens, len(tokens)) // seq_len)
    span = len(tokens) - seq_len
    starts = [i * span // (n_seq - 1) if n_seq > 1 else 0 for i in range(n_seq)]
    rows = np.stack([tokens[s : s + seq_len] for s in starts]).astype(np.int64)
    return [torch.from_numpy(rows[i : i + batch_size]) for i in range(0, n_seq, batch_size)]

"""The compress pipeline: state dict -> .qpk artifact under a byte budget, in named stages.

    load -> plan -> passthrough -> floor -> quantize + price -> solve + build -> write

load reads a checkpoint (path, state dict, or what qpack.checkpoint.load_state_dict returned); plan
(qpack.statedict) finds tied names and splits big matrices into row blocks; floor prices every block with
round-to-nearest at the fewest bits and refuses a budget below that before any expensive quantization;
quantize runs the real scheme only at the widths the budget can use (a round-to-nearest proxy of every width,
solved, tells which) and prices each candidate by encoding it exactly as it will be stored; solve + build
(qpack.budget.fit) chooses, builds the artifact in memory and measures it, so it can never exceed the budget.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import numpy as np
import torch

from .artifact import EncodedEntry, TensorEntry, build_artifact, encode_entry, section_codecs, usable_layouts
from .budget import Candidate, Choices, Fit, check_floor, fit, realize_lazily
from .codecs import Codec, make_codec, parse_codec
from .container import is_int
from .errors import BudgetError, QpackInputError
from .pack import LAYOUTS, encode_codes, zigzag
from .provenance import provenance
from .rd.steps import UNIFORM_BITS as _UNIFORM_BITS  # the widest uniform codes: the step sets the rate
from .quant.datafree import DEFAULT_DATAFREE_LOSS, check_datafree_loss, datafree_loss, head_columns, reference_ms
from .quant.base import MAX_BITS, MIN_BITS, QUANTIZERS, Quantized, as_matrix, make_quantizer
from .statedict import Plan, dtype_name, plan_state_dict, row_blocks
from .tune import TuneReport, Tuner

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# auto: fisher when compress is given Fisher sensitivities (calibration data), else mse
LOSS_PROXIES = ("auto", "mse", "hessian", "relative", "fisher", "kfac")
_T = TypeVar("_T")


#: the codecs compress tries per section by default (and the exported loader reads by default)
DEFAULT_CODECS: tuple[str, ...] = ("ans", "zstd", "ans_cols")


@dataclass(frozen=True)
class CompressConfig:
    """Everything `qpack compress` can be told; validated on construction."""

    budget: int | None = None  # bytes for artifact + code; None: fixed `bits` for every matrix
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)  # candidate widths when a budget is set
    fixed_bits: int = 6  # width for every matrix when no budget is set
    scheme: str = "auto"  # auto: gptq where a Hessian exists (with a budget: uniform steps), else gptq_lite
    group_size: int | None = None  # scale group size in columns; None: one scale per row
    codecs: tuple[str, ...] = DEFAULT_CODECS  # codec specs tried per section (the smallest is stored)
    passthrough_dtype: str = "fp16"  # how small tensors (norms, gains, scalars) are stored: fp16 or fp32
    min_numel: int = 4096  # tensors with fewer elements, or fewer than 2 dims, pass through
    fp16_candidate: bool = True  # let the solver keep a whole matrix in fp16 when the budget allows
    lqer_rank: int = 0  # rank of the low-rank error correction (0: off)
    lqer_top: int = 0  # number of tensors (largest error) that get it
    code_bytes: int = 0  # bytes of code shipped beside the artifact (counted against the budget)
    sdclip_k: tuple[float, ...] = ()  # SDClip k values: candidates in "search" mode, or the k of scheme "sdclip"
    loss_proxy: str = "auto"  # how the solver weighs a block's error across tensors: see LOSS_PROXIES
    chunk_numel: int = 65536  # with a budget, rows are split into blocks of about this many weights (max 8)
    # Code layouts (qpack.pack) each quantized candidate may be stored in; the smallest (layout, codec) wins.
    layouts: tuple[str, ...] = ("byte", "packed", "trit")
    # rate-aware steps (scheme "uniform", qpack.quant.uniform): codes (8 to 12 bits, as wide as the step needs) on a
    # grid of `step` standard deviations.
    steps: tuple[float, ...] | None = None  # steps offered with a budget (None: the scheme's default, see _steps_for)
    step: float | None = None  # scheme uniform without a budget: the one step for every matrix
    rdo: float = 0.0  # RDO rounding's Lagrange multiplier for the uniform steps (0: nearest level)
    # coordinate-descent sweeps after GPTQ on the uniform steps (qpack.quant.coord_descent); None: the default,
    # rd.steps.DEFAULT_CD_PASSES where GPTQ runs on steps
    cd_passes: int | None = None
    # a uniform step in units of the whole tensor's std ("flat") or of each row's ("std"); "auto": see rd.steps.rows_for
    step_rows: str = "auto"
    # LQER chosen by the budget solver (qpack.lqer_choice), with a budget and no fixed lqer_rank: every tensor is
    # offered a low-rank correction at each rank of lqer_ranks and factor widths of lqer_bits (B's scales per
    # lqer_group columns), bytes inside the budget. "auto" (the default) does so with calibration data: there it
    # measured fewer bytes at equal bpb at 16 of 17 sizes (benchmarks/rd); without data it did not pay
    # (benchmarks/datafree).
    # "on" offers it data-free too; "off": none, or the fixed lqer_rank/lqer_top mode.
    lqer: str = "auto"
    lqer_ranks: tuple[int, ...] = (4, 8, 16)
    lqer_bits: tuple[int, ...] = (2, 4)
    lqer_group: int = 64
    # datafree: how the solver weighs a tensor's error when it has no Hessian (qpack.quant.datafree)
    datafree_loss: str = DEFAULT_DATAFREE_LOSS

    def __post_init__(self) -> None:
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget <= 0):
            raise QpackInputError(f"budget must be a positive number of bytes, got {self.budget!r}")
        if not isinstance(self.bits, (tuple, list)):  # an int here is a common slip for fixed_bits
            raise QpackInputError(f"bits must be a sequence of candidate widths (e.g. (4, 6)), got {self.bits!r}; "
                                  "one width without a budget is fixed_bits")
        if not self.bits or any(not is_int(b) or not MIN_BITS <= b <= MAX_BITS for b in self.bits):
            raise QpackInputError(f"bits must be widths in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        if not MIN_BITS <= self.fixed_bits <= MAX_BITS:
            raise QpackInputError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {self.fixed_bits}")
        if self.scheme not in ("auto", "search"):
            known = _schemes()
            if self.scheme not in known:
                raise QpackInputError(f"unknown scheme {self.scheme!r}; known: auto, search, {', '.join(known)}")
        if self.loss_proxy not in LOSS_PROXIES:
            raise QpackInputError(f"loss proxy must be one of {', '.join(LOSS_PROXIES)}, got {self.loss_proxy!r}")
        check_datafree_loss(self.datafree_loss)
        if self.passthrough_dtype not in ("fp16", "fp32"):
            raise QpackInputError(f"passthrough dtype must be fp16 or fp32, got {self.passthrough_dtype!r}")
        if self.group_size is not None and self.group_size <= 0:
            raise QpackInputError(f"group size must be positive, got {self.group_size}")
        if self.lqer_rank < 0 or self.lqer_top < 0:
            raise QpackInputError("--lqer-rank and --lqer-top must not be negative")
        if (self.lqer_rank > 0) != (self.lqer_top > 0):
            raise QpackInputError("LQER needs both --lqer-rank and --lqer-top (one without the other does nothing)")
        if self.sdclip_k and self.scheme not in ("search", "sdclip"):
            raise QpackInputError(f"--sdclip-k applies to --scheme search or sdclip, not {self.scheme!r}")
        bad_k = [k for k in self.sdclip_k if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0]
        if bad_k:  # before any quantization: a k <= 0 would only fail once the scheme runs
            raise QpackInputError(f"--sdclip-k values must be positive numbers, got {bad_k[0]!r}")
        if not self.codecs:
            raise QpackInputError("at least one codec is needed")
        if not self.layouts or any(lay not in LAYOUTS for lay in self.layouts):
            raise QpackInputError(f"code layouts must be some of {', '.join(LAYOUTS)}, got {self.layouts!r}")
        if not {"byte", "packed"} & set(self.layouts):
            raise QpackInputError("code layouts need 'byte' or 'packed': 'trit' holds 2-bit codes only")
        for spec in self.codecs:
            parse_codec(spec)  # raises a clear error for unknown codecs or parameters
        from .lqer_choice import check_config
        from .rd.steps import check_rate_options

        check_rate_options(self)
        check_config(self)


def _schemes() -> list[str]:
    from .quant import _builtin  # noqa: F401

    return QUANTIZERS.names()


@dataclass
class TensorReport:
    """One line of the per-tensor table."""

    name: str
    shape: tuple[int, ...]
    scheme: str
    bits: int | None
    codec: str
    bytes: int
    rel_error: float
    est_loss: float
    layout: str | None = None  # code layout of a quantized tensor ("byte", "packed", "trit"); None: not quantized

    def as_dict(self) -> dict[str, Any]:
        numel = math.prod(self.shape) if self.shape else 1
        return {
            "name": self.name, "shape": list(self.shape), "scheme": self.scheme, "bits": self.bits,
            "layout": self.layout, "codec": self.codec, "bytes": self.bytes,
            "bits_per_param": 8 * self.bytes / max(numel, 1), "rel_error": self.rel_error, "est_loss": self.est_loss,
        }


@dataclass
class CompressResult:
    """What compress did: totals, the per-tensor table, stage times."""

    bytes_total: int
    bytes_model: int
    bytes_code: int
    budget: int | None
    params: int
    tensors: list[TensorReport]
    seconds: float
    output: str | None
    dry_run: bool
    stages: dict[str, float] = field(default_factory=dict)
    tune: dict[str, Any] | None = None  # passthrough tuning (qpack.tune.TuneReport.as_dict); None: not run

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes_model / max(self.params, 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes_total": self.bytes_total, "bytes_model": self.bytes_model, "bytes_code": self.bytes_code,
            "budget": self.budget, "headroom": None if self.budget is None else self.budget - self.bytes_total,
            "params": self.params, "bits_per_param": self.bits_per_param, "seconds": self.seconds,
            "output": self.output, "dry_run": self.dry_run, "stages": self.stages, "tune": self.tune,
            "tensors": [t.as_dict() for t in self.tensors],
        }


@dataclass
class Option:
    """One way to store one block, as the solver sees it: the encoded entry plus what the report needs."""

    encoded: EncodedEntry
    payload: Quantized | torch.Tensor
    scheme: str
    bits: int | None
    rel_error: float


@dataclass
class Loaded:
    """A state dict with what travels with it into the artifact's meta."""

    sd: dict[str, torch.Tensor]
    model_config: dict | None
    source: dict


Progress = Callable[[Iterable, str, int], Iterable]
Source = str | os.PathLike | Mapping[str, torch.Tensor] | tuple


def _no_progress(it: Iterable, desc: str, total: int) -> Iterable:
    return it


class _Stages:
    """Times each named stage of one compress run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[..., _T], *args: Any) -> _T:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- the pipeline


def compress(
    source: Source,
    output: str | os.PathLike | None,
    config: CompressConfig | None = None,
    *,
    model_config: dict | None = None,
    hessians: dict[str, torch.Tensor] | None = None,
    fisher: dict[str, torch.Tensor] | None = None,
    tune: Tuner | None = None,
    extra_meta: dict | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    **options: Any,
) -> CompressResult:
    """Compress a checkpoint (path, state dict, or qpack.checkpoint.load_state_dict's result) to `output`.

    Options are CompressConfig fields. `hessians` maps state-dict names to X^T X of that weight's input (see
    qpack.hessian); with them the default scheme is GPTQ and the solver can weigh errors by curvature.
    `fisher` maps names to the diagonal Fisher of the model's loss (qpack.calibrate.fisher), the same shape as
    the weight: loss proxy "fisher" (and "auto" when it is given) weighs every error by it. `tune`
    (qpack.calibrate.tuner) fits the unquantized float tensors to the float model once the quantized ones are
    chosen (qpack.tune), within the same budget.
    """
    t0 = time.perf_counter()
    cfg = replace(config, **options) if config is not None else CompressConfig(**options)
    cfg = resolve_loss_proxy(cfg, bool(fisher))
    stages = _Stages()
    loaded = stages.run("load", load_source, source, model_config, extra_meta)
    plan = stages.run("plan", make_plan, loaded.sd, cfg)
    job = _Job(cfg, loaded, plan, hessians or {}, progress or _no_progress, fisher)
    fixed = stages.run("passthrough", job.passthrough)
    stages.run("floor", job.refuse_impossible, fixed)
    choices = stages.run("quantize", job.candidates)
    choices, result = stages.run("solve", job.fit, fixed, choices)
    tuned = None
    if tune is not None:
        fixed, choices, result, tuned = stages.run("tune", job.tune, tune, fixed, choices, result)
    out = None
    if output is not None and not dry_run:
        from .container import atomic_write_bytes

        stages.run("write", atomic_write_bytes, output, result.blob)
        out = os.fspath(output)
    reports = job.reports(fixed, choices, result.pick, result.extra)
    return CompressResult(result.total, len(result.blob), cfg.code_bytes, cfg.budget, plan_params(loaded.sd, plan),
                          reports, time.perf_counter() - t0, out, dry_run, stages.seconds,
                          None if tuned is None else tuned.as_dict())


def resolve_loss_proxy(cfg: CompressConfig, have_fisher: bool) -> CompressConfig:
    """The config with loss proxy "auto" made concrete (fisher when Fisher is given, else mse); refuses
    "fisher" without it."""
    if cfg.loss_proxy == "auto":
        return replace(cfg, loss_proxy="fisher" if have_fisher else "mse")
    if cfg.loss_proxy in ("fisher", "kfac") and not have_fisher:
        raise QpackInputError(f"loss proxy {cfg.loss_proxy} needs Fisher sensitivities from calibration data: pass "
                              "--calib DATA (in Python: compress(..., fisher=fisher(model, tokens)), fisher from "
                              "qpack.calibrate)")
    return cfg


def load_source(source: Source, model_config: dict | None = None, extra_meta: dict | None = None) -> Loaded:
    """The state dict to compress, from a checkpoint path, a state dict, or a (state_dict, config, extra)
    triple as qpack.checkpoint.load_state_dict returns it; checks every entry is a tensor."""
    extra: dict = {}
    if isinstance(source, (str, os.PathLike)):
        from .checkpoint import load_state_dict

        source = load_state_dict(source)
    if isinstance(source, tuple):
        if len(source) != 3 or not isinstance(source[0], Mapping):
            raise QpackInputError("a loaded checkpoint is (state_dict, config, extra), as load_state_dict returns")
        sd, ckpt_config, extra = dict(source[0]), source[1], dict(source[2] or {})
        model_config = model_config if model_config is not None else ckpt_config
    elif isinstance(source, Mapping):
        sd = dict(source)
    else:
        raise QpackInputError(f"cannot compress a {type(source).__name__}: give a path, a state dict, or a checkpoint")
    if not sd:
        raise QpackInputError("the state dict holds no tensors")
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise QpackInputError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
    source_meta = {**(extra_meta or {}), **{k: v for k, v in extra.items() if _jsonable(v)}}
    return Loaded(sd, model_config, source_meta)


def make_plan(sd: Mapping[str, torch.Tensor], cfg: CompressConfig) -> Plan:
    """Tied names, and with a budget the row blocks of every quantizable matrix (each may take its own width)."""
    def split(name: str, t: torch.Tensor) -> list[tuple[int, int]]:
        if cfg.budget is None or not is_quantizable(t, cfg.min_numel):
            return [(0, t.shape[0] if t.ndim else 1)]
        return row_blocks(t.shape[0], t.numel(), cfg.chunk_numel)

    return plan_state_dict(sd, split)


def plan_params(sd: Mapping[str, torch.Tensor], plan: Plan) -> int:
    """Parameters stored (tied names count once)."""
    return sum(sd[n].numel() for n in plan.stored)


class _Job:
    """One compress run's state between stages: the config, the state dict, its plan and Hessians."""

    def __init__(self, cfg: CompressConfig, loaded: Loaded, plan: Plan, hessians: dict[str, torch.Tensor],
                 progress: Progress, fisher: dict[str, torch.Tensor] | None = None):
        self.cfg, self.sd, self.plan, self.hessians, self.progress = cfg, loaded.sd, plan, hessians, progress
        self.meta = {**provenance(loaded.model_config, loaded.source), **plan.to_meta()}
        self.enc = _Encoder(cfg)
        self.quant_names = [n for n in plan.stored if is_quantizable(self.sd[n], cfg.min_numel)]
        quant = set(self.quant_names)
        self.pass_names = [n for n in plan.stored if n not in quant]
        self.blocks = {n: plan.blocks(n, self.sd[n].shape[0]) for n in self.quant_names}
        self.widths = cfg.bits if cfg.budget is not None else (cfg.fixed_bits,)
        self._prepared: dict[tuple, Any] = {}  # GPTQ state per matrix, reused across widths and rounds
        self.fisher = _fisher_for(cfg, self.sd, self.quant_names, fisher)
        # A run with neither Hessians nor Fisher weighs errors by the data-free loss; a calibrated run keeps one
        # unit for every tensor (its proxy), so a tensor without a Hessian there falls back to mse as before.
        self._datafree = cfg.datafree_loss if not hessians and not self.fisher else None
        # data-free: a tied head's columns weighed (and its steps scaled) by the final norm's gain
        self._head_cols = head_columns(self.sd, self.quant_names) if self._datafree not in (None, "mse") else {}

    @cached_property
    def _datafree_ref(self) -> float | None:
        """qpack.quant.datafree.reference_ms of the quantized tensors, computed once per job."""
        return reference_ms({n: self.sd[n].detach().float() for n in self.quant_names})

    # -- passthrough: small tensors stored as they are (fp16 or fp32 for floats)
    def passthrough(self, values: Mapping[str, torch.Tensor] | None = None) -> dict[str, Option]:
        """Every passthrough tensor encoded; `values` replaces some of them (tuned, qpack.tune), errors still
        measured against the checkpoint's own."""
        out: dict[str, Option] = {}
        self._fixed = out
        for n in self.pass_names:
            t = _passthrough_tensor(values[n] if values and n in values else self.sd[n], self.cfg.passthrough_dtype)
            err = _rel_error(self.sd[n].double(), t.double()) if t.is_floating_point() else 0.0
            out[n] = Option(self.enc.passthrough(n, t), t, "passthrough", None, err)
        return out

    # -- floor: refuse a budget below what round-to-nearest at the fewest bits costs, before quantizing
    def refuse_impossible(self, fixed: dict[str, Option]) -> None:
        if self.cfg.budget is None:
            return
        estimate = self.cfg.code_bytes + sum(o.encoded.nbytes for o in fixed.values())
        for n in self.quant_names:
            w = self.sd[n].detach().float()
            cheapest = []  # round-to-nearest at the fewest bits and/or on the coarsest uniform step
            if _schemes_for(self.cfg, n in self.hessians):
                cheapest.append(make_quantizer("rtn", min(self.widths), self.cfg.group_size).quantize(w))
            steps = _steps_for(self.cfg, n in self.hessians)
            if steps:
                cheapest.append(self._on_grid(n, w, max(steps), self._rows(n)))
            for b in self.blocks[n]:
                estimate += min(_predicted_bytes(slice_rows(q, b.r0, b.r1) if len(self.blocks[n]) > 1 else q)
                                for q in cheapest)
        check_floor(self.cfg.budget, estimate)

    # -- quantize + price
    def candidates(self) -> list[Choices]:
        """Real candidates per block, measured exactly; with a budget only at the widths the solver reaches for."""
        self._menu: dict[str, list[tuple[str, dict, int | None]]] = {}
        for n in self.quant_names:
            menu = [(s, p, b) for b in self.widths for s, p in _schemes_for(self.cfg, n in self.hessians)]
            menu += [("uniform", {"step": st, "rdo": self.cfg.rdo, "rows": self._rows(n),
                      "cd": _cd_passes(self.cfg) if n in self.hessians else 0},
                      _UNIFORM_BITS)
                     for st in _steps_for(self.cfg, n in self.hessians)]  # by step: neighbours err alike
            if self.cfg.budget is not None and self.cfg.fp16_candidate:
                menu.append(("fp16", {}, None))  # kept last: see _fp16_index
            self._menu[n] = menu
        blocks = [b for n in self.quant_names for b in self.blocks[n]]
        realized: dict[str, dict[int, Candidate]] = {}
        if self.cfg.budget is None:  # one candidate per block: nothing to choose
            for n in self.progress(self.quant_names, "quantize", len(self.quant_names)):
                self._realize(n, 0, realized)
            return [Choices(b.entry, [realized[b.entry][0]]) for b in blocks]
        by_entry = {b.entry: b.tensor for b in blocks}
        realize = lambda entry, i: self._realize(by_entry[entry], i, realized)  # noqa: E731
        if self._datafree == "common":  # one step for all (qpack.rd.common_step); no GPTQ without data
            return self._common(blocks, realized, realize)
        proxies: dict[str, list[Candidate]] = {}
        for n in self.progress(self.quant_names, "price", len(self.quant_names)):
            proxies.update(self._proxies(n))
            if self.cfg.fp16_candidate:  # fp16 is cheap to price exactly: always a real candidate
                self._realize(n, len(self._menu[n]) - 1, realized)
        capacity = self._capacity(blocks)
        try:
            choices = realize_lazily([Choices(b.entry, proxies[b.entry]) for b in blocks], realized, realize, capacity)
            if not any(_steps_for(self.cfg, n in self.hessians) for n in self.quant_names):
                return choices
            from .rd.refine import realize_neighbours

            def on_grid(entry: str, j: int) -> bool:  # a uniform step: its neighbours on the menu are finer/coarser
                menu = self._menu[by_entry[entry]]
                return 0 <= j < len(menu) and menu[j][0] == "uniform"

            return realize_neighbours(choices, realized, realize, capacity, on_grid)
        finally:
            self._prepared.clear()

    def _capacity(self, blocks: list) -> int:
        """Room for the blocks, less a first guess at the manifest; qpack.budget.fit corrects it by measuring."""
        fixed_bytes = sum(o.encoded.nbytes for o in self._fixed.values())
        return self.cfg.budget - self.cfg.code_bytes - fixed_bytes - 96 * (len(blocks) + len(self._fixed)) - 512

    def _common(self, blocks: list, realized: dict[str, dict[int, Candidate]],
                realize: Callable[[str, int], None]) -> list[Choices]:
        """Data-free loss "common" (qpack.rd.common_step): one step s for every tensor (the embedding's finer by
        qpack.quant.datafree.common_step_divisor), bisected on the estimated bytes; each menu becomes s and a
        few slightly finer steps, and the solver fills the budget from those."""
        from .quant.datafree import common_step_divisor
        from .rd.common_step import bisect_step, fill_steps

        for n in self.quant_names:
            if not any(item[0] == "uniform" for item in self._menu[n]):
                raise QpackInputError(f"data-free loss 'common' puts every tensor on one uniform step, but {n} has "
                                      "none on its menu: use --scheme uniform")
        rows = {n: self._rows(n) for n in self.quant_names}
        div = {n: common_step_divisor(self.sd[n], n, self._datafree_ref) for n in self.quant_names}
        capacity = self._capacity(blocks)

        @functools.lru_cache(maxsize=None)  # the bisection and the real-bytes check ask for the same steps again
        def size_at(step: float) -> int:
            total = 0
            for n in self.progress(self.quant_names, f"step {step:.4g}", len(self.quant_names)):
                q = self._on_grid(n, self.sd[n].detach().float(), step / div[n], rows[n])
                parts = self.blocks[n]
                total += sum(_predicted_bytes(slice_rows(q, b.r0, b.r1) if len(parts) > 1 else q) for b in parts)
            return total

        def set_menus(step: float) -> None:
            for n in self.quant_names:
                self._menu[n] = [("uniform", {"step": st / div[n], "rdo": self.cfg.rdo, "rows": rows[n], "cd": 0},
                                  _UNIFORM_BITS) for st in fill_steps(step)]

        grid = [item[1]["step"] for n in self.quant_names for item in self._menu[n] if item[0] == "uniform"]
        step = bisect_step(size_at, capacity, min(grid), max(grid))
        # The estimate leaves out the codec's framing and tables: encode every block at that step, and bisect
        # again on the estimate scaled by what the real bytes were (the fill alone spans too little to absorb it).
        set_menus(step)
        own = len(fill_steps(step)) - 1
        for n in self.progress(self.quant_names, "measure", len(self.quant_names)):
            self._realize(n, own, realized)
        real = sum(realized[b.entry][own].nbytes for b in blocks)
        ratio = real / max(size_at(step), 1)
        if abs(ratio - 1) > 1e-3:
            realized.clear()
            step = bisect_step(lambda st: int(size_at(st) * ratio), capacity, min(grid), max(grid))
            set_menus(step)
        proxies: dict[str, list[Candidate]] = {}
        for n in self.progress(self.quant_names, "price", len(self.quant_names)):
            proxies.update(self._proxies(n))
        return realize_lazily([Choices(b.entry, proxies[b.entry]) for b in blocks], realized, realize, capacity)

    def _proxies(self, n: str) -> dict[str, list[Candidate]]:
        """Round-to-nearest estimates of every menu item for each block of `n`: predicted bytes and loss."""
        w = self.sd[n].detach().float()
        h = self.hessians.get(n)
        hd = torch.diagonal(h) if h is not None and self.cfg.loss_proxy not in ("mse", "fisher", "kfac") else None
        blocks = self.blocks[n]
        out: dict[str, list[Candidate]] = {b.entry: [] for b in blocks}
        rtn: dict[Any, Quantized] = {}
        for scheme, params, bits in self._menu[n]:
            # widths: round-to-nearest at that width; uniform steps: rounding on that grid (no GPTQ, no RDO)
            key = ("uniform", params["step"], params["rows"]) if scheme == "uniform" else bits
            if bits is not None and key not in rtn:
                rtn[key] = (self._on_grid(n, w, params["step"], params["rows"]) if scheme == "uniform"
                            else make_quantizer("rtn", bits, self.cfg.group_size).quantize(w))
            for b in blocks:
                if bits is None:
                    p: Quantized | torch.Tensor = w[b.r0:b.r1].to(torch.float16)
                else:
                    p = slice_rows(rtn[key], b.r0, b.r1) if len(blocks) > 1 else rtn[key]
                wq = (p.dequantize() if isinstance(p, Quantized) else p.float()).reshape(w[b.r0:b.r1].shape)
                fr = self._fisher_rows(n, b)
                loss = (datafree_loss(w[b.r0:b.r1], wq, self._datafree, n, self._datafree_ref, p, self._col_weight(n))
                        if self._datafree is not None and fr is None else _diag_loss(w[b.r0:b.r1], wq, hd, fr))
                out[b.entry].append(Candidate(_menu_label(scheme, params, bits) + "~", _predicted_bytes(p), loss))
        return out

    def _realize(self, n: str, i: int, realized: dict[str, dict[int, Candidate]]) -> None:
        """Quantize tensor `n` with menu item `i` for real and price every block of it exactly."""
        scheme, params, bits = self._menu[n][i]
        w = self.sd[n].detach().float()
        h = self.hessians.get(n)
        blocks = self.blocks[n]
        if bits is None:
            payloads = [w[b.r0:b.r1].to(torch.float16).contiguous() for b in blocks]
        else:
            q = self._quantize(n, scheme, params, bits, w, h)
            payloads = [slice_rows(q, b.r0, b.r1) if len(blocks) > 1 else q for b in blocks]
        dtype = dtype_name(self.sd[n].dtype)
        for b, p in zip(blocks, payloads):
            wb = w[b.r0:b.r1]
            wq = (p.dequantize() if isinstance(p, Quantized) else p.float()).reshape(wb.shape)
            label = _menu_label(scheme, params, bits)
            opt = Option(self.enc.candidate(b.entry, p, dtype if bits is not None else None), p,
                         "fp16" if bits is None else scheme, bits, _rel_error(wb, wq))
            loss = _loss(wb, wq, h, self.cfg.loss_proxy, self._fisher_rows(n, b), self._datafree, n,
                         self._datafree_ref if self._datafree is not None else None, p, self._col_weight(n))
            realized.setdefault(b.entry, {})[i] = Candidate(label, opt.encoded.nbytes, loss, data=opt)

    def _quantize(self, n: str, scheme: str, params: dict, bits: int, w: torch.Tensor,
                  h: torch.Tensor | None) -> Quantized:
        """One width of the real scheme; GPTQ factorizes each matrix's Hessian once for all its widths."""
        if scheme == "uniform":  # every step sweeps the same prepared GPTQ (the one plain gptq uses too)
            from .quant.gptq import GPTQ

            if h is None:
                return self._on_grid(n, w, params["step"], params["rows"], params["rdo"])
            key = (n, "gptq", ())
            if key not in self._prepared:
                self._prepared[key] = GPTQ(as_matrix(w), h)
            return _uniform(**params).quantize_prepared(w, self._prepared[key], self._row_weight(n))
        quantizer = make_quantizer(scheme, bits, self.cfg.group_size, **params)
        if not hasattr(quantizer, "prepare") or h is None:
            return quantizer.quantize(w, h)
        key = (n, scheme, tuple(sorted(params.items())))
        if key not in self._prepared:
            self._prepared[key] = quantizer.prepare(w, h)
        return quantizer.quantize_prepared(self._prepared[key], tuple(w.shape))

    def _rows(self, n: str) -> str:
        """The uniform quantizer's row mode for tensor `n` (step_rows "fisher": "weighted" by the Fisher)."""
        rows = _rows_for(self.cfg, n in self.hessians)
        if rows != "fisher":
            return rows
        if n not in self.fisher:
            raise QpackInputError("step rows 'fisher' needs Fisher sensitivities (compress --calib, loss proxy fisher)")
        return "weighted"

    def _row_weight(self, n: str) -> torch.Tensor | None:
        """Per-row sensitivities of tensor `n` for rows="weighted": its Fisher's row means (None otherwise)."""
        return as_matrix(self.fisher[n]).mean(dim=1) if self._rows(n) == "weighted" else None

    def _col_weight(self, n: str) -> torch.Tensor | None:
        """Per-column sensitivities of tensor `n` (a tied head's final-norm gain, data-free), else None."""
        return self._head_cols.get(n)

    def _on_grid(self, n: str, w: torch.Tensor, step: float, rows: str, rdo: float = 0.0) -> Quantized:
        """Tensor `n` (weights `w`) rounded on the uniform grid of `step` without a Hessian, with its row and
        column sensitivities."""
        return _uniform(step, rdo, rows).quantize(w, row_weight=self._row_weight(n), col_weight=self._col_weight(n))

    def _fisher_rows(self, n: str, b: Any) -> torch.Tensor | None:
        """The Fisher of block `b` of tensor `n` under loss proxy fisher, else None."""
        f = self.fisher.get(n)
        return None if f is None else f[b.r0:b.r1]

    # -- solve + build: qpack.budget.fit, over every width when the widths realized cannot fit
    def fit(self, fixed: dict[str, Option], choices: list[Choices]) -> tuple[list[Choices], Fit]:
        try:
            result = fit(choices, self.cfg.budget, self.cfg.code_bytes, lambda pick: self.build(fixed, choices, pick))
        except BudgetError:
            full = self._all_candidates(choices)
            if full is None:
                raise
            choices = full
            result = fit(full, self.cfg.budget, self.cfg.code_bytes, lambda pick: self.build(fixed, full, pick))
        from .lqer_choice import LqerChooser, active

        # LQER groups priced against these picks, then solved with them
        if active(self.cfg, calibrated=bool(self.hessians)):
            result = LqerChooser(self, fixed, choices).run(result)
        return choices, result

    # -- tune: the passthrough float tensors fitted to the float model around the chosen quantized ones
    def tune(self, tuner: Tuner, fixed: dict[str, Option], choices: list[Choices], result: Fit
             ) -> tuple[dict[str, Option], list[Choices], Fit, TuneReport]:
        """Run `tuner` on the artifact's dequantized state dict; store what it tuned in place of the passthrough
        values, with the same picks when the bytes still fit, else solved again around the new values."""
        from .artifact import loads_artifact
        from .statedict import assemble

        names = [n for n in self.pass_names if self.sd[n].is_floating_point()]
        report = tuner(assemble(loads_artifact(result.blob)), names)
        if not report.values:
            return fixed, choices, result, report
        unknown = sorted(set(report.values) - set(names))
        if unknown:
            raise QpackInputError(f"the tuner returned {unknown[0]!r}, which is not a passthrough float tensor")
        new = self.passthrough({n: v.detach().to("cpu").reshape(self.sd[n].shape) for n, v in report.values.items()})
        blob, extra = self.build(new, choices, result.pick, result.extra)
        total = len(blob) + self.cfg.code_bytes
        if self.cfg.budget is None or total <= self.cfg.budget:
            return new, choices, Fit(result.pick, blob, total, extra), report
        choices, result = self.fit(new, choices)  # the tuned values coded larger than the headroom left
        return new, choices, result, report

    def _all_candidates(self, choices: list[Choices]) -> list[Choices] | None:
        """Every menu item realized (None when they already were): the exact answer when the lazy one fell short."""
        if self.cfg.budget is None:
            return None
        realized = {ch.name: {} for ch in choices}
        have = {ch.name: {c.label for c in ch.candidates} for ch in choices}
        if all(len(have[b.entry]) == len(self._menu[n]) for n in self.quant_names for b in self.blocks[n]):
            return None
        for n in self.quant_names:
            for i in range(len(self._menu[n])):
                self._realize(n, i, realized)
        return [Choices(ch.name, [realized[ch.name][i] for i in sorted(realized[ch.name])]) for ch in choices]

    # -- build: the whole artifact in memory for one pick (LQER on the largest errors)
    def build(self, fixed: dict[str, Option], choices: list[Choices], pick: list[int],
              lowranks: dict[str, EncodedEntry] | None = None) -> tuple[bytes, dict]:
        """The artifact for one pick; `lowranks` (entries carrying factors) replaces the fixed-mode LQER."""
        chosen = {ch.name: ch.candidates[i] for ch, i in zip(choices, pick)}
        lowranks = self._lqer(chosen) if lowranks is None else lowranks
        entries = [fixed[n].encoded for n in self.pass_names]
        for ch in choices:
            opt: Option = chosen[ch.name].data
            entries.append(lowranks[ch.name] if ch.name in lowranks else opt.encoded)
        return build_artifact(entries, self.meta, verify=False), lowranks

    def _lqer(self, chosen: dict[str, Candidate]) -> dict[str, EncodedEntry]:
        """Entries with low-rank error factors for the `lqer_top` quantized blocks of largest estimated loss."""
        if self.cfg.lqer_rank <= 0:
            return {}
        from .quant.lqer import fit_lqer

        quant = [(n, c) for n, c in chosen.items() if isinstance(c.data.payload, Quantized)]
        quant.sort(key=lambda nc: (-nc[1].loss, nc[0]))
        by_entry = {b.entry: b for n in self.quant_names for b in self.blocks[n]}
        out = {}
        for n, c in quant[: self.cfg.lqer_top]:
            b = by_entry[n]
            w = as_matrix(self.sd[b.tensor].float()[b.r0:b.r1])
            rank = min(self.cfg.lqer_rank, *w.shape)
            factors = fit_lqer(w, as_matrix(c.data.payload.dequantize()), rank)
            out[n] = self.enc.candidate(n, c.data.payload, dtype_name(self.sd[b.tensor].dtype), factors)
        return out

    def reports(self, fixed: dict[str, Option], choices: list[Choices], pick: list[int],
                lowranks: dict[str, EncodedEntry]) -> list[TensorReport]:
        out = []
        for n in self.pass_names:
            o = fixed[n]
            out.append(TensorReport(n, tuple(self.sd[n].shape), "passthrough", None, o.encoded.codec_label(),
                                    o.encoded.nbytes, o.rel_error, 0.0))
        for ch, i in zip(choices, pick):
            c = ch.candidates[i]
            o: Option = c.data
            enc = lowranks.get(ch.name, o.encoded)
            # the stored width: a uniform block's codes are as wide as its step needs (8-12), not the menu's cap
            bits = enc.manifest.get("bits", o.bits)
            scheme = o.scheme + ("+cols" if "col_scale" in enc.manifest else "") + \
                ("+lqer" if ch.name in lowranks else "")
            out.append(TensorReport(ch.name, tuple(o.payload.shape), scheme, bits, enc.codec_label(), enc.nbytes,
                                    o.rel_error, c.loss, enc.manifest.get("layout")))
        return out


class _Encoder:
    """Encodes entries as they will be stored: each section with the smallest configured codec and layout.

    Passthrough tensors are small and try every codec (and raw). For the big sections a generic codec such as
    zstd costs a trial compression per candidate, so trials are pre-selected on a sample and kept when they win
    or come within 2% there. fp16 candidates: each codec on 64 KiB of the first one. Codes: every (layout,
    codec) pair on the first 64 Ki codes of each tensor at each width (one symbol per byte, bit-packed, and as
    trits at 2 bits), a pair kept against the best pair, so packed+zstd competes with byte+ans on equal terms;
    a tensor's row blocks share its choice. (One choice per width for all tensors, made on the embedding's
    sample, made cpu-smoke 13% larger at --bits 3 and 0.8% at --bits 4.) Every size the solver sees is
    still the exact size of the stored bytes, in the layout and codec they are stored with."""

    SAMPLE = 1 << 16

    def __init__(self, cfg: CompressConfig):
        self.codecs: list[Codec] = [parse_codec(s) for s in cfg.codecs]
        self.layouts = cfg.layouts
        self.raw = make_codec("raw")
        self._useful: dict[tuple, list[Codec]] = {}
        self._pairs: dict[tuple[str, str, int], dict[str, list[Codec]]] = {}

    def _select(self, kind: tuple, sample: bytes) -> list[Codec]:
        if kind not in self._useful:
            sizes = [len(c.encode(sample)) for c in self.codecs]
            best = min(sizes)
            self._useful[kind] = [c for c, n in zip(self.codecs, sizes) if n <= best * 1.02 + 16]
        return self._useful[kind]

    def code_choice(self, q: Quantized, family: str = "", kind: str = "codes") -> dict[str, list[Codec]]:
        """Layout -> the codecs worth a full trial for codes of q's width in `family` (a tensor: its row blocks
        share one choice) and kind ("codes", "lowrank.a" or "lowrank.b"), chosen on the first such sample."""
        key = (kind, family, q.bits)
        if key in self._pairs:
            return self._pairs[key]
        values = q.q.reshape(-1)
        # At 8 bits "packed" is byte for byte the "byte" layout: store it as "byte".
        # past 8 bits the one layout is "planes", whatever cfg.layouts names for narrow codes
        layouts = [lay for lay in self.layouts if lay in usable_layouts(q.bits)] or [usable_layouts(q.bits)[0]]
        width = int(q.q.shape[-1])
        # whole rows, so that a codec that codes rows (ans_cols) sees them (one row when a row is longer)
        sample = values[: max(self.SAMPLE // width, 1) * width].cpu().numpy()
        sizes = {(lay, i): len(c.encode(encode_codes(sample, q.bits, lay)))
                 for lay in layouts
                 for i, c in enumerate(section_codecs(self.codecs, lay, sample.size, width))}
        best = min(sizes.values())
        keep = {lay: [c for i, c in enumerate(self.codecs) if sizes[lay, i] <= best * 1.02 + 16] for lay in layouts}
        self._pairs[key] = {lay: cs for lay, cs in keep.items() if cs}
        if values.numel() <= sample.size:  # the sample was all of q: its sizes are exact, only the best is worth it
            lay, i = min(sizes, key=lambda li: (sizes[li], layouts.index(li[0]), li[1]))
            return {lay: [self.codecs[i]]}
        return self._pairs[key]

    def passthrough(self, name: str, t: torch.Tensor) -> EncodedEntry:
        """A small tensor as it is, with the smallest of every codec and raw."""
        return encode_entry(TensorEntry(name, t, codec=[*self.codecs, self.raw]))

    def candidate(self, name: str, payload: Quantized | torch.Tensor, dtype: str | None = None,
                  lowrank: tuple[Quantized, Quantized] | None = None) -> EncodedEntry:
        """One block's candidate (quantized, or an fp16 copy) as it would be stored."""
        if isinstance(payload, torch.Tensor):
            rows = max(1, self.SAMPLE // max(1, payload[0].numel() * payload.element_size()))
            codecs = self._select(("fp16",), _tensor_bytes(payload[:rows])[: self.SAMPLE])
            return encode_entry(TensorEntry(name, payload, codec=codecs))
        keep = dtype if dtype in ("float64", "float32", "float16", "bfloat16") else None
        family = name.rsplit("#rows", 1)[0]  # row blocks of one tensor (qpack.statedict.part_name) share a choice
        factor_layout = None
        if lowrank is not None:  # both factors share one choice: the union of what each width keeps
            factor_layout = {}
            for tag, f in zip("ab", lowrank):
                for lay, cs in self.code_choice(f, family, f"lowrank.{tag}").items():
                    have = factor_layout.setdefault(lay, [])
                    have += [c for c in cs if c not in have]
        return encode_entry(TensorEntry(name, payload, layout=self.code_choice(payload, family), codec=None,
                                        scale_codec=[self.raw, *self.codecs], lowrank=lowrank, dtype=keep,
                                        lowrank_layout=factor_layout))


# ----------------------------------------------------------------------------------------------- helpers

def _jsonable(value: Any) -> bool:
    """Plain JSON data (what a checkpoint's extra keys may carry into the artifact's meta)."""
    import json

    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def is_quantizable(t: torch.Tensor, min_numel: int) -> bool:
    """Matrices (2+ dims) of floats with at least `min_numel` elements are quantized; the rest pass through."""
    return t.dtype in FLOAT_DTYPES and t.ndim >= 2 and t.numel() >= min_numel


def _passthrough_tensor(t: torch.Tensor, dtype: str) -> torch.Tensor:
    if t.dtype in FLOAT_DTYPES:
        return t.detach().to(torch.float16 if dtype == "fp16" else torch.float32).contiguous()
    return t.detach().contiguous()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _rel_error(w: torch.Tensor, wq: torch.Tensor) -> float:
    num = float(torch.linalg.vector_norm((w - wq).to(torch.float64)))
    den = float(torch.linalg.vector_norm(w.to(torch.float64)))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def estimate_loss(w: torch.Tensor, wq: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """Estimated loss increase of replacing w by wq: Hessian-weighted when H is known, else 0.5*||w-wq||^2."""
    from .crownq import expected_loss_increase

    return float(expected_loss_increase(as_matrix(w), as_matrix(wq), hessian))


def _fisher_for(cfg: CompressConfig, sd: Mapping[str, torch.Tensor], names: list[str],
                fisher: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The Fisher of every quantized tensor under loss proxy fisher ({} otherwise). A tensor the Fisher does not
    cover (a buffer: no gradient) is weighed by the mean Fisher of those it does, which keeps its errors on the
    same scale as everyone else's."""
    if cfg.loss_proxy not in ("fisher", "kfac") or not fisher:
        return {}
    from .sensitivity import check_fisher

    given = check_fisher(dict(fisher), dict(sd))
    have = [given[n] for n in names if n in given]
    if not have:
        raise QpackInputError("the Fisher sensitivities cover none of the quantized tensors")
    mean = float(sum(float(f.double().sum()) for f in have) / sum(f.numel() for f in have))
    return {n: given[n] if n in given else torch.tensor(mean, device=sd[n].device).expand(tuple(sd[n].shape))
            for n in names}


def _loss(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor | None, proxy: str,
          fisher: torch.Tensor | None = None, datafree: str | None = None, name: str = "",
          ref_ms: float | None = None, payload: Quantized | torch.Tensor | None = None,
          col_weight: torch.Tensor | None = None) -> float:
    """The solver's loss for one block of tensor `name` under the configured proxy (`fisher`: the block's Fisher,
    proxy fisher; `datafree`: the data-free loss of a run with neither Hessians nor Fisher, qpack.quant.datafree,
    with its per-column weights `col_weight`)."""
    if proxy in ("fisher", "kfac") and fisher is not None:
        from .sensitivity import fisher_weighted_loss, kron_weighted_loss

        if proxy == "kfac" and h is not None:
            return kron_weighted_loss(w, wq, fisher, h)
        return fisher_weighted_loss(w, wq, fisher)
    if datafree is not None:
        return datafree_loss(w, wq, datafree, name, ref_ms, payload, col_weight)
    if proxy == "mse" or h is None:
        return estimate_loss(w, wq, None)
    if proxy == "relative":
        return estimate_loss(w, wq, h) / max(estimate_loss(w, torch.zeros_like(w), h), 1e-30) * w.numel()
    return estimate_loss(w, wq, h)


def _diag_loss(w: torch.Tensor, wq: torch.Tensor, hdiag: torch.Tensor | None,
               fisher: torch.Tensor | None = None) -> float:
    """A cheap proxy loss: squared error, weighted per weight by the Fisher when given, else per input column
    by diag(H) when given."""
    if fisher is not None:
        from .sensitivity import fisher_weighted_loss

        return fisher_weighted_loss(w, wq, fisher)
    e = (as_matrix(w) - as_matrix(wq)).to(torch.float64).square()
    return float((e * hdiag.to(torch.float64).reshape(1, -1)).sum() / 2 if hdiag is not None else e.sum() / 2)


def _predicted_bytes(payload: Quantized | torch.Tensor) -> int:
    """Bytes an order-0 entropy coder (ans) needs for a payload: entropy of its symbols plus tables."""
    if isinstance(payload, torch.Tensor):
        sym = np.frombuffer(_tensor_bytes(payload), dtype=np.uint8)
        return _entropy_bytes(np.bincount(sym, minlength=256)) + 16
    extra = 2 * payload.scales.numel() + 64 + (0 if payload.col_scale is None else 2 * payload.col_scale.numel())
    if payload.bits > 8:  # layout "planes" under per-plane ans tables (qpack.pack, artifact.per_plane)
        z = zigzag(payload.q.reshape(-1).cpu().numpy())
        return sum(_entropy_bytes(np.bincount(p, minlength=256)) for p in (z >> 8, z & 0xFF)) + extra
    codes = payload.q.reshape(-1).to(torch.int16) + 128
    return _entropy_bytes(torch.bincount(codes.cpu(), minlength=256).numpy()) + extra


def _entropy_bytes(counts: np.ndarray) -> int:
    """Order-0 entropy of symbols with these counts, in whole bytes, plus about two bytes per table entry."""
    used = counts[counts > 0].astype(np.float64)
    bits = float(-(used * np.log2(used / used.sum())).sum()) if used.size else 0.0
    return int(math.ceil(bits / 8)) + 2 * int(used.size)


def code_size(files: Iterable[str | os.PathLike], codec: str | None) -> int:
    """Bytes the code files take as they would ship: raw, or compressed together with `codec`."""
    blobs = []
    for f in files:
        p = Path(f)
        try:
            blobs.append(p.read_bytes())
        except OSError as exc:
            raise QpackInputError(f"{p}: cannot read code file: {exc.strerror or exc}") from None
    if codec is None:
        return sum(len(b) for b in blobs)
    return len(parse_codec(codec).encode(b"".join(blobs)))


def slice_rows(q: Quantized, r0: int, r1: int) -> Quantized:
    """Rows r0:r1 of a quantized tensor, as a quantized tensor of its own."""
    shape = (r1 - r0,) + tuple(q.shape[1:]) if len(q.shape) > 1 else (r1 - r0, q.q.shape[1])
    return Quantized(q.q[r0:r1].contiguous(), q.scales[r0:r1].contiguous(), shape, q.bits,
                     q.scheme, q.group_size, dict(q.params), q.col_scale)




def _uniform(step: float, rdo: float = 0.0, rows: str = "flat", cd: int = 0) -> Any:
    """The uniform quantizer at one step (qpack.quant.uniform)."""
    return make_quantizer("uniform", _UNIFORM_BITS, None, step=step, rdo=rdo, rows=rows, cd=cd)


def _cd_passes(cfg: CompressConfig) -> int:
    """Coordinate-descent sweeps after GPTQ on each uniform step (qpack.rd.steps.cd_passes_for)."""
    from .rd.steps import cd_passes_for

    return cd_passes_for(cfg)


def _rows_for(cfg: CompressConfig, has_hessian: bool) -> str:
    """How one tensor's uniform steps scale with its rows (qpack.rd.steps.rows_for)."""
    from .rd.steps import rows_for

    return rows_for(cfg, has_hessian)


def _steps_for(cfg: CompressConfig, has_hessian: bool) -> tuple[float, ...]:
    """The uniform steps on one tensor's menu (qpack.rd.steps.steps_for)."""
    from .rd.steps import steps_for

    return steps_for(cfg, has_hessian)


def _menu_label(scheme: str, params: dict, bits: int | None) -> str:
    """A menu item's name in the candidate tables: fp16, scheme/intB, or uniform/stepS."""
    if bits is None:
        return "fp16"
    if scheme == "uniform":
        rows = {"std": "/rowstd", "weighted": "/rowfisher"}.get(params.get("rows"), "")
        return (f"uniform/step{params['step']:.4g}" + rows + (f"/rdo{params['rdo']:g}" if params.get("rdo") else "")
                + (f"/cd{params['cd']}" if params.get("cd") else ""))
    return f"{scheme}/int{bits}"


def _schemes_for(cfg: CompressConfig, has_hessian: bool) -> list[tuple[str, dict]]:
    """The (scheme, params) pairs tried at every width for one tensor (uniform steps: see _steps_for)."""
    from .rd.steps import auto_takes_steps

    if cfg.scheme == "uniform" or auto_takes_steps(cfg, has_hessian):
        return []
    if cfg.scheme == "auto":
        return [("gptq", {}) if has_hessian else ("gptq_lite", {})]
    if cfg.scheme == "search":
        out = [("gptq", {})] if has_hessian else []
        out += [("gptq_lite", {})] + [("sdclip", {"k": k}) for k in cfg.sdclip_k]
        return out
    if cfg.scheme == "gptq" and not has_hessian:
        return [("gptq_lite", {})]
    if cfg.scheme == "sdclip" and cfg.sdclip_k:
        return [("sdclip", {"k": k}) for k in cfg.sdclip_k]
    return [(cfg.scheme, {})]

"""Which uniform steps `qpack compress` offers a matrix, and the checks on the options that set them.

Scheme "uniform" (qpack.quant.uniform) stores codes (8 to 12 bits, as wide as the step needs) on a grid of `step`
standard deviations; with an entropy coder the step is the rate knob, so with a budget each matrix's menu is a
grid of steps (instead of, or besides, the widths) and the solver equalizes the marginal loss per byte across blocks. Without a budget one `step` is used.
"""
from __future__ import annotations

import math
from typing import Any

from ..errors import QpackInputError
from ..quant.base import MAX_CODE_BITS
from .candidates import step_grid

#: The default menu of steps: 0.03 / 2^(FINER_STEPS / 8) to 4 standard deviations, 8 per octave. At 0.03 a
#: Gaussian tensor's codes span about the int8 range (about 7 bits/param under ans: naive int8's rate); the
#: FINER_STEPS below it take 9-10 bit codes, for budgets above int8's; at 4 nearly every code is zero. 8 per
#: octave measured better than 4 on cpu-smoke from 2.5 to 4.5 bits/param (benchmarks/rd, README
#: "Rate-distortion"). The finer steps are prepended so the grid from 0.03 up is exactly the one measured.
FINER_STEPS = 8
DEFAULT_STEPS: tuple[float, ...] = tuple(0.03 * 2 ** (-k / 8) for k in range(FINER_STEPS, 0, -1)) \
    + tuple(step_grid(0.03, 4.0, 8))
UNIFORM_BITS = MAX_CODE_BITS  # the widest uniform codes: the step, not the width, sets the rate
#: Coordinate-descent sweeps after GPTQ on every uniform step (qpack.quant.coord_descent) unless told otherwise.
#: Off: they cut each layer's error by 1-5% at unchanged bytes, but val_bpb at equal bytes moved inside the
#: realization noise, better at every size on cpu-small2 and worse at most on cpu-smoke (benchmarks/rd, series "cd").
DEFAULT_CD_PASSES = 0


def _positive(name: str, value: Any) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    if not ok:
        raise QpackInputError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _auto_menu(cfg: Any) -> bool:
    """Scheme "auto" with a budget and the default menu (no `steps` given, `bits` not narrowed)."""
    default_bits = type(cfg).__dataclass_fields__["bits"].default
    return (cfg.scheme == "auto" and cfg.budget is not None and cfg.steps is None
            and tuple(cfg.bits) == tuple(default_bits))


def auto_takes_steps(cfg: Any, has_hessian: bool) -> bool:
    """Whether scheme "auto" puts uniform steps (GPTQ on the grid) on this matrix's menu instead of GPTQ widths:
    with a Hessian and a budget, unless widths were asked for (`bits` narrowed from the default, or steps=()).
    Measured: fewer bytes at equal val_bpb than the widths at most sizes (README "Rate-distortion")."""
    return has_hessian and _auto_menu(cfg)


def auto_adds_steps(cfg: Any, has_hessian: bool) -> bool:
    """Whether scheme "auto" offers a matrix without a Hessian uniform steps (rounding on the grid, each row's std
    the unit) besides its GPTQ-lite widths: with a budget, unless widths were asked for. Measured without data
    (benchmarks/datafree): steps beat the widths at SDClip's bytes on all three models, the widths fill an int8-sized
    budget better (steps stop at int8 codes, the next thing up is fp16); the solver takes each where it pays."""
    return not has_hessian and _auto_menu(cfg)


def steps_for(cfg: Any, has_hessian: bool) -> tuple[float, ...]:
    """The uniform steps offered to one matrix under CompressConfig `cfg` (empty: none)."""
    if cfg.budget is None:
        return (float(cfg.step),) if cfg.scheme == "uniform" else ()
    if cfg.steps is not None:
        return tuple(float(s) for s in cfg.steps)
    return DEFAULT_STEPS if cfg.scheme == "uniform" or auto_takes_steps(cfg, has_hessian) \
        or auto_adds_steps(cfg, has_hessian) else ()


#: CompressConfig.step_rows values; "auto" resolves per tensor (rows_for)
STEP_ROWS = ("auto", "flat", "std", "fisher")


def rows_for(cfg: Any, has_hessian: bool) -> str:
    """Whether a tensor's uniform step is in units of the tensor's std ("flat"), of each row's ("std"), or the flat
    step scaled per row by the row's mean Fisher ("fisher", qpack.quant.uniform.row_factors). auto: flat with a
    Hessian (GPTQ and the solver see the output error directly), std without one."""
    if cfg.step_rows != "auto":
        return cfg.step_rows
    return "flat" if has_hessian else "std"


def cd_passes_for(cfg: Any) -> int:
    """Coordinate-descent sweeps after GPTQ on each uniform step: as given, else DEFAULT_CD_PASSES (they only run
    where GPTQ does, i.e. with a Hessian)."""
    return DEFAULT_CD_PASSES if cfg.cd_passes is None else int(cfg.cd_passes)


def check_rate_options(cfg: Any) -> None:
    """Refuse step/steps/rdo settings that are invalid or would do nothing (QpackInputError, one line)."""
    if isinstance(cfg.rdo, bool) or not isinstance(cfg.rdo, (int, float)) or not math.isfinite(cfg.rdo) \
            or cfg.rdo < 0:
        raise QpackInputError(f"rdo (the RDO rounding multiplier) must be a number >= 0, got {cfg.rdo!r}")
    cd = cfg.cd_passes
    if cd is not None and (isinstance(cd, bool) or not isinstance(cd, int) or cd < 0):
        raise QpackInputError(f"cd passes (coordinate-descent sweeps after GPTQ) must be an integer >= 0, got {cd!r}")
    if cfg.step_rows not in STEP_ROWS:
        raise QpackInputError(f"step rows must be one of {', '.join(STEP_ROWS)}, got {cfg.step_rows!r}")
    if cfg.step is not None:
        _positive("step", cfg.step)
        if cfg.scheme != "uniform":
            raise QpackInputError(f"--step applies to --scheme uniform, not {cfg.scheme!r}")
        if cfg.budget is not None:
            raise QpackInputError("--step fixes one step without --budget; with a budget the solver picks steps "
                                  "(give a menu with --steps)")
    if cfg.steps is not None:
        if cfg.budget is None:
            raise QpackInputError("--steps is the menu the budget solver picks from: it needs --budget "
                                  "(without one, --scheme uniform --step S)")
        if cfg.scheme == "uniform" and not cfg.steps:
            raise QpackInputError("scheme uniform needs at least one step")
        for s in cfg.steps:
            _positive("step", s)
    if cfg.scheme == "uniform":
        if cfg.budget is None and cfg.step is None:
            raise QpackInputError("scheme uniform needs --budget (the solver picks a step per block) or --step S")
        if cfg.group_size is not None:
            raise QpackInputError("scheme uniform has one step per row: --group-size does not apply")
    if cd and not steps_for(cfg, True):
        raise QpackInputError("cd passes refine GPTQ on uniform steps: use --budget with the default scheme, or "
                              "--scheme uniform")
    if cfg.rdo > 0 and not steps_for(cfg, True) and not steps_for(cfg, False):
        raise QpackInputError("rdo applies to uniform steps: use --scheme uniform (or give --steps)")

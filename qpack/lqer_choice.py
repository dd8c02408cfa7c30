"""LQER inside the budget solver: which tensors get a low-rank error correction, at what rank and widths.

Each quantized tensor gets one extra solver group, "<name>#lqer", beside its row blocks. Its options are
"none" (0 bytes, no change) and every (rank, A width, B width) of the configured menu, each priced by the
exact bytes its factors add to the stored entries (plus the container bytes per factor-carrying entry,
measured once per run) and by its loss change (negative: the share of the tensor's error it removes, weighted
by the Hessian when one is known, times the loss its blocks carry under the solver's proxy), both measured
against the quantization currently picked for that tensor's blocks. Factors span the whole tensor (one SVD of
W - Wq over all its row blocks); a row-split tensor stores its rows of A in each block and B in every block,
and the price counts those copies.

The option's value depends on the blocks' picks and the picks on the options, so `LqerChooser.run` alternates:
price against the current picks, solve everything with qpack.budget.fit (which builds and measures each
choice, so the file never exceeds the budget), re-price, solve again, until the picks stop moving (at most
`ROUNDS`). The build always fits the factors against the picks it builds, so what is stored is exact; of the
rounds (and the plain fit without LQER), the one of least estimated loss is kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .budget import Candidate, Choices, Fit, fit
from .errors import QpackInputError
from .quant.base import Quantized, as_matrix
from .quant.lqer import FACTOR_BITS, error_svd, fit_factors, hessian_root

if TYPE_CHECKING:  # compress imports this module; the types are only for reading
    from .artifact import EncodedEntry
    from .compress import CompressConfig, Option, _Job

ROUNDS = 3
MODES = ("off", "auto", "on")


@dataclass(frozen=True)
class LqerOption:
    """One way to correct a tensor: the rank and the widths of its factors A and B."""

    rank: int
    a_bits: int
    b_bits: int

    @property
    def label(self) -> str:
        return f"lqer r{self.rank} A{self.a_bits} B{self.b_bits}"


def check_config(cfg: "CompressConfig") -> None:
    """Refuse LQER settings that cannot work (called from CompressConfig's validation)."""
    if cfg.lqer not in MODES:
        raise QpackInputError(f"--lqer must be one of {', '.join(MODES)}, got {cfg.lqer!r}")
    if not cfg.lqer_ranks or any(not isinstance(r, int) or r <= 0 for r in cfg.lqer_ranks):
        raise QpackInputError(f"--lqer-ranks must be positive integers, got {cfg.lqer_ranks}")
    if not cfg.lqer_bits or any(b not in FACTOR_BITS for b in cfg.lqer_bits):
        raise QpackInputError(f"--lqer-bits must be widths among {', '.join(map(str, FACTOR_BITS))}, "
                              f"got {cfg.lqer_bits}")
    if not isinstance(cfg.lqer_group, int) or cfg.lqer_group <= 0:
        raise QpackInputError(f"--lqer-group must be a positive number of columns, got {cfg.lqer_group!r}")


def active(cfg: "CompressConfig", calibrated: bool) -> bool:
    """Whether the solver chooses LQER: a budget to trade factor bytes against, no fixed --lqer-rank/--lqer-top
    (which keeps its own mode), and mode on, or auto (the default) with calibration data (Hessians)."""
    if cfg.budget is None or cfg.lqer_rank != 0:
        return False
    return cfg.lqer == "on" or (cfg.lqer == "auto" and calibrated)


def menu(cfg: "CompressConfig") -> list[LqerOption]:
    """Every (rank, A width, B width) the solver may pick, in a fixed order."""
    return [LqerOption(r, a, b) for r in sorted(set(cfg.lqer_ranks)) for a in sorted(set(cfg.lqer_bits))
            for b in sorted(set(cfg.lqer_bits))]


class LqerChooser:
    """Adds LQER groups to one compress run's solved choices and re-solves (see the module docstring)."""

    def __init__(self, job: "_Job", fixed: dict[str, "Option"], choices: list[Choices]):
        self.job, self.fixed, self.choices = job, fixed, choices
        self.cfg = job.cfg
        self.menu = menu(self.cfg)
        self.tensors = list(job.quant_names)
        self.pos = {ch.name: i for i, ch in enumerate(choices)}
        self._svd: dict[tuple, tuple] = {}
        self._chol: dict[str, torch.Tensor | None] = {}
        self._per_entry: float | None = None
        self._kept: list[int] | None = None  # block picks of the best fit so far
        self._made: dict[tuple, tuple[dict[str, "EncodedEntry"], float]] = {}
        self._fit: dict[tuple, tuple[Quantized, Quantized, float, int]] = {}
        from .codecs import make_codec, parse_codec

        self._codecs = [*(parse_codec(c) for c in self.cfg.codecs), make_codec("raw")]

    # -- the state of one tensor under a pick
    def _picked(self, n: str, pick: list[int]) -> list[tuple[Any, Candidate]]:
        return [(b, self.choices[self.pos[b.entry]].candidates[pick[self.pos[b.entry]]]) for b in self.job.blocks[n]]

    def _key(self, n: str, pick: list[int]) -> tuple:
        return (n,) + tuple(pick[self.pos[b.entry]] for b in self.job.blocks[n])

    def _weights(self, n: str) -> torch.Tensor | None:
        """The root L of tensor `n`'s damped Hessian (H = L L^T), or None without one."""
        if n not in self._chol:
            cols = as_matrix(self.job.sd[n][:1]).shape[1]
            self._chol[n] = hessian_root(self.job.hessians.get(n), cols)
        return self._chol[n]

    def fitted(self, n: str, pick: list[int], opt: LqerOption) -> tuple[Quantized, Quantized, float, int] | None:
        """Factors A, B of `opt` fitted to tensor `n`'s error under `pick`, the loss change they bring and the
        bytes of their sections (each block's rows of A and a copy of B, encoded with the smallest configured
        codec); None when a block of `n` is not quantized (fp16 stores no factors).

        The loss change is the share of the tensor's error the factors remove, measured Hessian-weighted when a
        Hessian is known (GPTQ leaves its error where the curvature is low; plain squared error would overrate
        correcting it), times the loss its blocks have under the solver's proxy: in the proxy's own units."""
        picked = self._picked(n, pick)
        if not all(isinstance(c.data.payload, Quantized) for _, c in picked):
            return None
        key = self._key(n, pick) + (opt,)
        if key not in self._fit:
            w = as_matrix(self.job.sd[n].detach().float())
            wq = torch.cat([as_matrix(c.data.payload.dequantize()) for _, c in picked], 0)
            err = (w - wq).to(torch.float64)
            L = self._weights(n)
            rank = min(opt.rank, *w.shape)
            skey = self._key(n, pick)
            if skey not in self._svd:
                self._svd[skey] = error_svd(err, L)
            qa, qb = fit_factors(err, rank, opt.a_bits, opt.b_bits, self.cfg.lqer_group, self._svd[skey])
            rest = err - qa.dequantize().to(torch.float64) @ qb.dequantize().to(torch.float64)
            weigh = (lambda e: float((e @ L).square().sum())) if L is not None else (
                lambda e: float(e.square().sum()))
            before = weigh(err)
            share = 1.0 - weigh(rest) / before if before > 0 else 0.0
            nbytes = len(picked) * self._section_bytes(qb) + sum(self._section_bytes(a) for a in self._rows(qa, picked))
            self._fit[key] = (qa, qb, -share * sum(c.loss for _, c in picked), nbytes)
        return self._fit[key]

    def _section_bytes(self, f: Quantized) -> int:
        """Bytes of one factor's codes and scales sections, each with the smallest configured codec (or raw)."""
        from .artifact import TensorEntry, encode_entry

        return encode_entry(TensorEntry("factor", f, codec=self._codecs, scale_codec=self._codecs)).nbytes

    @staticmethod
    def _rows(qa: Quantized, picked: list) -> list[Quantized]:
        from .compress import slice_rows

        return [slice_rows(qa, b.r0, b.r1) if len(picked) > 1 else qa for b, _ in picked]

    def made(self, n: str, pick: list[int], opt: LqerOption) -> tuple[dict[str, "EncodedEntry"], float] | None:
        """The block entries of `n` carrying the factors of `opt` (encoded exactly as stored) and their loss
        change; None as for `fitted`."""
        got = self.fitted(n, pick, opt)
        if got is None:
            return None
        key = self._key(n, pick) + (opt,)
        if key not in self._made:
            from .statedict import dtype_name

            qa, qb, delta, _ = got
            picked = self._picked(n, pick)
            dtype = dtype_name(self.job.sd[n].dtype)
            self._made[key] = ({b.entry: self.job.enc.candidate(b.entry, c.data.payload, dtype, (a, qb))
                                for (b, c), a in zip(picked, self._rows(qa, picked))}, delta)
        return self._made[key]

    def _overhead(self, pick: list[int]) -> float:
        """Bytes one entry's factors add beyond their sections' price (the section table, the compressed
        manifest, and any difference between the codecs the stored entry uses and the smallest), measured once:
        every tensor at the menu's first option against a build without factors."""
        if self._per_entry is None:
            lowranks: dict[str, "EncodedEntry"] = {}
            for n in self.tensors:
                got = self.made(n, pick, self.menu[0])
                if got is not None:
                    lowranks.update(got[0])
            self._per_entry = 0.0
            if lowranks:
                plain = len(self.job.build(self.fixed, self.choices, pick, {})[0])
                full = len(self.job.build(self.fixed, self.choices, pick, lowranks)[0])
                priced = sum(f[3] for n in self.tensors if (f := self.fitted(n, pick, self.menu[0])) is not None)
                self._per_entry = max(0.0, (full - plain - priced) / len(lowranks))
        return self._per_entry

    def price(self, n: str, pick: list[int]) -> Choices:
        """The LQER group of tensor `n`, priced against `pick`: each option's factor sections plus the measured
        per-entry overhead. Options that remove no loss are left out, and so are those another option beats on
        both loss and bytes. The stored entries are encoded only when a build picks the option."""
        cands = [Candidate("none", 0, 0.0, None)]
        fitted = [(opt, self.fitted(n, pick, opt)) for opt in self.menu]
        if any(f is None for _, f in fitted):
            return Choices(f"{n}#lqer", cands)
        per_entry = self._overhead(pick)
        priced = [(opt, f[2], f[3] + math.ceil(per_entry * len(self.job.blocks[n]))) for opt, f in fitted if f[2] < 0]
        for opt, loss, nbytes in priced:
            if not any(l2 <= loss and b2 <= nbytes and (l2, b2) != (loss, nbytes) for _, l2, b2 in priced):
                cands.append(Candidate(opt.label, nbytes, loss, opt))
        return Choices(f"{n}#lqer", cands)

    # -- solve and build
    def _split(self, pick: list[int], groups: list[Choices]) -> tuple[list[int], dict[str, LqerOption]]:
        nb = len(self.choices)
        opts = {n: groups[i].candidates[p].data for i, (n, p) in enumerate(zip(self.tensors, pick[nb:]))}
        return list(pick[:nb]), {n: o for n, o in opts.items() if o is not None}

    def lowranks(self, block_pick: list[int], opts: dict[str, LqerOption]) -> dict[str, "EncodedEntry"]:
        """The block entries that carry factors, fitted against `block_pick`."""
        out: dict[str, "EncodedEntry"] = {}
        for n, opt in opts.items():
            got = self.made(n, block_pick, opt)
            if got is not None:  # a block went to fp16 since pricing: no factors for that tensor
                out.update(got[0])
        return out

    def loss(self, block_pick: list[int], opts: dict[str, LqerOption]) -> float:
        """Estimated loss of a choice: the blocks' candidates plus each correction's (measured) change."""
        total = sum(ch.candidates[i].loss for ch, i in zip(self.choices, block_pick))
        for n, opt in opts.items():
            got = self.fitted(n, block_pick, opt)
            total += got[2] if got is not None else 0.0
        return total

    def _forget(self, pick: list[int]) -> None:
        """Drop factors fitted against picks other than `pick` and the best so far (their entries hold bytes)."""
        live = {self._key(n, pick) for n in self.tensors}
        if self._kept is not None:
            live |= {self._key(n, self._kept) for n in self.tensors}
        self._made = {k: v for k, v in self._made.items() if k[:-1] in live}
        self._fit = {k: v for k, v in self._fit.items() if k[:-1] in live}
        self._svd = {k: v for k, v in self._svd.items() if k in live}

    def run(self, plain: Fit) -> Fit:
        """The best of the plain fit and up to ROUNDS price-and-solve rounds with LQER groups."""
        best, best_loss = plain, self.loss(plain.pick, {})
        pick, opts = list(plain.pick), {}
        for _ in range(ROUNDS):
            self._forget(pick)
            groups = [self.price(n, pick) for n in self.tensors]

            def build(p: list[int], groups: list[Choices] = groups) -> tuple[bytes, dict]:
                bp, o = self._split(p, groups)
                return self.job.build(self.fixed, self.choices, bp, self.lowranks(bp, o))

            got = fit(self.choices + groups, self.cfg.budget, self.cfg.code_bytes, build)
            new_pick, new_opts = self._split(got.pick, groups)
            loss = self.loss(new_pick, new_opts)
            if loss < best_loss:
                best, best_loss = Fit(new_pick, got.blob, got.total, got.extra), loss
                self._kept = new_pick
            if new_pick == pick and new_opts == opts:
                break
            pick, opts = new_pick, new_opts
        return best

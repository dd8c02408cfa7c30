"""`qpack compress --scheme uniform`: a grid of steps per matrix on the budget solver's menu, GPTQ on that grid."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from qpack.cli import main
from qpack.compress import CompressConfig, compress
from qpack.errors import BudgetError, QpackInputError
from qpack.quant.base import make_quantizer
from qpack.rd.steps import DEFAULT_STEPS
from qpack.statedict import load


def _model(seed: int = 0):
    """An embedding, four linear layers of different scales with Hessians of uneven input scale, a norm."""
    g = torch.Generator().manual_seed(seed)
    # "l0.norm.weight": a block norm, not a final one, so no column-scaled head (qpack.quant.datafree.head_columns)
    sd = {"emb.weight": torch.randn(512, 64, generator=g) * 0.1, "l0.norm.weight": torch.rand(64, generator=g) + 0.5}
    hs = {}
    for i in range(4):
        u = torch.rand(256, 64, generator=g) - 0.5  # Laplace weights (heavy tails) by the inverse CDF
        sd[f"l{i}.weight"] = -0.02 * (i + 1) * u.sign() * torch.log1p(-2 * u.abs())
        X = torch.randn(512, 64, generator=g) * (torch.rand(64, generator=g) * 2 + 0.1)
        hs[f"l{i}.weight"] = X.T @ X / 512
    return sd, hs


PARAMS = 512 * 64 + 64 + 4 * 256 * 64
OPTS = dict(scheme="uniform", chunk_numel=4096)  # 8 row blocks per matrix: fine steps for the solver to fill with
FAST = dict(OPTS, steps=DEFAULT_STEPS[::2])  # 4 steps per octave: half the candidates, for the tests of behaviour


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _scales(w: torch.Tensor, step: float, per_row: bool = False, qmax: int = 2047) -> torch.Tensor:
    """Per-row steps written out independently: step * std(tensor) (or, `per_row`, of each row), widened so that
    no weight needs |q| > qmax (12-bit codes: compress's uniform steps go past int8)."""
    std = w.std(dim=1, correction=0, keepdim=True) if per_row else w.std(correction=0)
    top = w.abs().amax(dim=1, keepdim=True)
    s = _fp16(torch.maximum(step * std, top / qmax))
    # a widened step that fp16 rounded short would clip: the next fp16 value up (numpy's nextafter, in float16)
    up = torch.from_numpy(np.nextafter(s.numpy().astype(np.float16), np.float16(np.inf)).astype(np.float32))
    return torch.where(s * qmax < top, up, s)


@pytest.mark.parametrize("bpp", [2.5, 4.0, 6.0])
def test_lands_under_and_within_half_a_percent(tmp_path, bpp):
    sd, hs = _model()
    budget = int(bpp * PARAMS / 8)
    res = compress(sd, tmp_path / "m.qpk", budget=budget, hessians=hs, **OPTS)
    size = (tmp_path / "m.qpk").stat().st_size
    assert size == res.bytes_total <= budget
    assert size >= 0.995 * budget, (size, budget)
    assert {t.scheme.removesuffix("+lqer") for t in res.tensors if t.name != "l0.norm.weight"} <= {"uniform", "fp16"}


def test_artifact_holds_codes_on_one_grid_step_per_block(tmp_path):
    sd, hs = _model(1)
    res = compress(sd, tmp_path / "m.qpk", budget=int(3.5 * PARAMS / 8), hessians=hs, **FAST)
    back = load(tmp_path / "m.qpk")
    found = set()
    for t in res.tensors:
        if t.scheme != "uniform":
            continue
        name, _, rows = t.name.partition("#rows")
        r0, r1 = (int(x) for x in rows.split("-")) if rows else (0, sd[name].shape[0])
        w, got = sd[name], back[name][r0:r1]
        # some step of the menu explains every row of the block: integer codes within +-127 on that grid
        ok = []
        for step in DEFAULT_STEPS:  # step_rows auto: a tensor without a Hessian has steps in its rows' stds
            s = _scales(w, step, per_row=name not in hs)[r0:r1]
            q = got / s
            if torch.equal(q, torch.round(q)) and int(q.abs().max()) <= 127:
                ok.append(step)
        assert ok, t.name
        found.add(ok[0])
    assert len(found) > 1  # the solver used more than one step


@pytest.mark.parametrize("step", [0.4, 0.02])  # at 0.02 std most rows' codes go past int8 (9-10 bits)
def test_fixed_step_without_budget_is_gptq_on_that_grid_bit_exact(tmp_path, step):
    sd, hs = _model(2)
    compress(sd, tmp_path / "g.qpk", scheme="uniform", step=step, hessians=hs)
    compress(sd, tmp_path / "r.qpk", scheme="uniform", step=step, step_rows="flat")  # the grid GPTQ's has
    gptq, rtn = load(tmp_path / "g.qpk"), load(tmp_path / "r.qpk")
    for name, w in sd.items():
        if name == "l0.norm.weight":
            assert torch.equal(rtn[name], _fp16(w))
            continue
        s = _scales(w, step)
        assert float((rtn[name] - w).abs().max()) <= float(s.max()) / 2 * 1.01  # nothing clipped
        # without Hessians: nearest level on the grid, computed here independently
        assert torch.equal(rtn[name], torch.round(w / s).clamp(-2047, 2047) * s), name
        if name in hs:  # with them: GPTQ on the same grid: same levels, different (better) choices
            q = gptq[name] / s
            assert torch.equal(q, torch.round(q)) and not torch.equal(gptq[name], rtn[name])
            d_g, d_r = (gptq[name] - w).double(), (rtn[name] - w).double()
            H = hs[name].double()
            assert torch.einsum("ij,jk,ik->", d_g, H, d_g) < torch.einsum("ij,jk,ik->", d_r, H, d_r)


def test_a_budget_above_int8s_takes_codes_past_8_bits(tmp_path):
    # at 10 bits/param every matrix gets a finer grid than int8's finest (per-row absmax / 127) could give it
    sd, _ = _model(2)
    n = sum(t.numel() for t in sd.values())
    budget = int(n * 10 / 8) + 4000
    res = compress(sd, tmp_path / "w.qpk", budget=budget, scheme="uniform")
    assert res.bytes_total <= budget
    out = load(tmp_path / "w.qpk")
    wide = [t for t in res.tensors if t.bits and t.bits > 8]
    assert wide and all(t.layout == "planes" for t in wide)
    for t in wide:
        w = sd[t.name]
        s = _fp16(w.abs().amax(dim=1, keepdim=True) / 127)
        int8_err = (torch.round(w / s).clamp(-127, 127) * s - w).pow(2).sum()
        assert (out[t.name] - w).pow(2).sum() < 0.75 * int8_err, t.name


def test_a_step_past_twelve_bits_widens_and_nothing_clips():
    # max|w| / 2047 rounded to fp16 is short of max|w| / 2047 in about half the rows; unguarded, those rows clip
    w = torch.randn(64, 300, generator=torch.Generator().manual_seed(5))
    q = make_quantizer("uniform", 12, step=1e-4, rows="flat").quantize(w)
    s = _scales(w, 1e-4)
    assert q.bits == 12 and int(q.q.abs().max()) <= 2047
    assert torch.equal(q.scales.float(), s)
    assert bool(((q.dequantize() - w).abs() <= s / 2 * (1 + 1e-6)).all())
    assert torch.equal(q.dequantize(), torch.round(w / s) * s)


def test_more_budget_never_raises_the_estimated_loss():
    sd, hs = _model(3)
    losses = []
    for bpp in (2.0, 3.5, 6.0):
        res = compress(sd, None, budget=int(bpp * PARAMS / 8), hessians=hs, loss_proxy="hessian", **FAST)
        losses.append(sum(t.est_loss for t in res.tensors))
    assert all(b <= a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.2 * losses[0]


def test_floor_prices_the_coarsest_step():
    sd, hs = _model()
    # far below anything: refused before quantizing
    with pytest.raises(BudgetError):
        compress(sd, None, budget=2_000, hessians=hs, **OPTS)
    # the coarsest step (4 std) codes nearly every weight as 0: far below round-to-nearest int2, so a budget
    # under int2's floor is still reachable with uniform steps
    int2 = compress(sd, None, budget=int(2.3 * PARAMS / 8), bits=(2,), fp16_candidate=False).bytes_total
    # (flat steps: per-row steps give the 64-wide embedding 512 distinct fp16 scales, 0.25 bit per weight)
    res = compress(sd, None, budget=int(0.6 * int2), hessians=hs, **OPTS, step_rows="flat")
    assert res.bytes_total <= int(0.6 * int2)


def test_mixed_menu_takes_the_cheaper_kind_per_block():
    # heavy-tailed weights: absmax widths waste levels on the tails, uniform steps do not; a menu holding both
    # must do about as well as steps alone and clearly better than widths alone
    sd, hs = _model(4)
    budget = int(3.0 * PARAMS / 8)
    kw = dict(budget=budget, hessians=hs, chunk_numel=4096, loss_proxy="hessian")
    loss = {name: sum(t.est_loss for t in compress(sd, None, **kw, **o).tensors)
            for name, o in [("mixed", dict(steps=DEFAULT_STEPS[::2])), ("widths", dict(steps=())),
                                 ("steps", dict(scheme="uniform", steps=DEFAULT_STEPS[::2]))]}
    assert loss["mixed"] < 0.8 * loss["widths"], loss
    assert loss["mixed"] < 1.05 * loss["steps"], loss


@pytest.mark.parametrize("opts", [dict(scheme="uniform"), dict(scheme="uniform", step=0.0),
                                  dict(scheme="uniform", step=-1.0), dict(scheme="uniform", budget=10_000, rdo=-0.1),
                                  dict(scheme="uniform", budget=10_000, steps=(0.5, 0.0)),
                                  dict(scheme="uniform", budget=10_000, steps=()),
                                  dict(scheme="uniform", budget=10_000, step=0.5), dict(step=0.5),
                                  dict(scheme="uniform", steps=(0.5,)), dict(budget=10_000, rdo=0.1, steps=()),
                                  dict(scheme="uniform", step=0.5, group_size=32), dict(scheme="nope"),
                                  dict(scheme="uniform", step=0.5, step_rows="rows")])
def test_config_refuses_bad_or_idle_options(opts):
    with pytest.raises(QpackInputError):
        CompressConfig(**opts)


def _cli(*args: str):
    return CliRunner().invoke(main, ["compress", *args])


@pytest.mark.parametrize("flags", [["--scheme", "uniform"], ["--scheme", "uniform", "--step", "0"],
                                   ["--scheme", "uniform", "--step", "-0.5"],
                                   ["--scheme", "uniform", "--budget", "40KB", "--rdo", "-1"],
                                   ["--scheme", "uniform", "--budget", "40KB", "--steps", "0.5,x"],
                                   ["--scheme", "uniform", "--step", "0.5", "--bits", "4"],
                                   ["--scheme", "uniform", "--step", "0.5", "--step-rows", "rows"],
                                   ["--scheme", "bogus"]])
def test_cli_bad_input_one_line_exit_2_no_file(tmp_path, flags):
    sd, _ = _model()
    ckpt = tmp_path / "m.pt"
    torch.save(sd, ckpt)
    out = tmp_path / "m.qpk"
    r = _cli(str(ckpt), "-o", str(out), "-q", *flags)
    assert r.exit_code == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qpack: error: ") and "Traceback" not in r.output
    assert not out.exists()


@pytest.mark.parametrize("flags,per_row", [([], True), (["--step-rows", "flat"], False),
                                           (["--step-rows", "std"], True)])
def test_cli_fixed_step(tmp_path, flags, per_row):
    # without --calib there is no Hessian: auto takes each row's std as the unit (SDClip's per-row scale)
    sd, _ = _model()
    ckpt = tmp_path / "m.pt"
    torch.save(sd, ckpt)
    r = _cli(str(ckpt), "-o", str(tmp_path / "m.qpk"), "-q", "--scheme", "uniform", "--step", "0.4", *flags)
    assert r.exit_code == 0, r.stderr
    s = _scales(sd["l2.weight"], 0.4, per_row)
    assert (s.reshape(-1).unique().numel() > 1) == per_row
    assert torch.equal(load(tmp_path / "m.qpk")["l2.weight"], torch.round(sd["l2.weight"] / s).clamp(-127, 127) * s)


def test_mse_proxy_spends_bytes_where_the_weights_are_large():
    # equal marginal mse per byte means one absolute step everywhere: relative errors fall as the scale grows
    sd, hs = _model(5)
    res = compress(sd, None, budget=int(3.5 * PARAMS / 8), hessians=hs, **FAST)
    rel = {}
    for t in res.tensors:
        rel.setdefault(t.name.split("#")[0], []).append(t.rel_error)
    assert min(rel["l0.weight"]) > max(rel["l3.weight"])


def test_auto_with_hessians_and_a_budget_takes_uniform_steps():
    sd, hs = _model(6)
    budget = int(3.0 * PARAMS / 8)
    auto = compress(sd, None, budget=budget, hessians=hs)
    assert {t.scheme.removesuffix("+lqer") for t in auto.tensors if t.name.split("#")[0] in hs} <= {"uniform", "fp16"}
    # the embedding has no Hessian: GPTQ-lite widths and uniform steps (rounding, per-row std) on its menu;
    # widths asked for (bits or steps=()): GPTQ widths
    emb = {t.scheme.removesuffix("+lqer") for t in auto.tensors if t.name.startswith("emb")}
    assert emb <= {"gptq_lite", "uniform", "fp16"}
    from qpack.rd.steps import auto_adds_steps
    assert auto_adds_steps(CompressConfig(budget=budget), False) and not auto_adds_steps(CompressConfig(), False)
    for opts in (dict(steps=()), dict(bits=(3, 4, 5))):
        res = compress(sd, None, budget=budget, hessians=hs, **opts)
        assert {t.scheme.removesuffix("+lqer") for t in res.tensors if t.name.split("#")[0] in hs} <= {"gptq", "fp16"}


def test_row_factors_are_the_inverse_root_of_relative_sensitivity():
    from qpack.quant.uniform import row_factors, uniform_scales

    # geometric mean of 1, 4, 16 is 4: steps (g / 4) ** -0.5
    assert torch.allclose(row_factors(torch.tensor([1.0, 4.0, 16.0])).reshape(-1), torch.tensor([2.0, 1.0, 0.5]))
    # a sensitivity ratio of 1e6 would ask for 1000x steps: held to 1/8..8
    assert torch.allclose(row_factors(torch.tensor([1.0, 1e6])).reshape(-1), torch.tensor([8.0, 0.125]))
    # on quarter octaves: 3x the geometric mean asks for 3 ** -0.5 = 2 ** -0.79, stored as 2 ** -0.75
    assert torch.allclose(row_factors(torch.tensor([3.0, 1 / 3])).reshape(-1), torch.tensor([2 ** -0.75, 2 ** 0.75]))
    w = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    s = uniform_scales(w, 0.5, 8, "weighted", torch.tensor([1.0, 4.0, 16.0]))
    assert torch.equal(s.reshape(-1), _fp16(0.5 * w.std(correction=0) * torch.tensor([2.0, 1.0, 0.5])))
    with pytest.raises(QpackInputError):
        uniform_scales(w, 0.5, 8, "weighted", None)


def test_fisher_rows_lower_the_fisher_loss_at_the_same_budget(tmp_path):
    # rows whose Fisher differs 100x: equal marginal loss per bit wants finer steps on the sensitive rows. Rows of
    # 512 weights, as in real models (per-row scales are a small part of their bytes)
    g = torch.Generator().manual_seed(7)
    sd, hs = {}, {}
    for i in range(4):
        sd[f"l{i}.weight"] = torch.randn(64, 512, generator=g) * 0.02 * (i + 1)
        X = torch.randn(1024, 512, generator=g) * (torch.rand(512, generator=g) * 2 + 0.1)
        hs[f"l{i}.weight"] = X.T @ X / 1024
    fisher = {n: (10 ** (2 * torch.rand(t.shape[0], 1, generator=g))).expand(t.shape).contiguous()
              for n, t in sd.items() if t.dim() == 2}
    budget = int(3.5 * 4 * 64 * 512 / 8)
    loss = {}
    for rows in ("flat", "fisher"):
        res = compress(sd, tmp_path / f"{rows}.qpk", budget=budget, hessians=hs, fisher=fisher, step_rows=rows,
                       **FAST)
        assert res.bytes_total <= budget
        loss[rows] = sum(t.est_loss for t in res.tensors)
    assert loss["fisher"] < 0.95 * loss["flat"], loss
    # the artifact's steps follow the Fisher: within a matrix, the more sensitive row has the finer step
    back = load(tmp_path / "fisher.qpk")
    w, f = sd["l1.weight"], fisher["l1.weight"][:, 0]
    i, j = int(f.argmax()), int(f.argmin())
    nz = lambda r: back["l1.weight"][r][back["l1.weight"][r] != 0].abs().min()  # noqa: E731
    assert nz(i) < nz(j)


def test_fisher_rows_need_a_fisher():
    sd, hs = _model()
    with pytest.raises(QpackInputError):
        compress(sd, None, budget=int(3.5 * PARAMS / 8), hessians=hs, step_rows="fisher", **FAST)

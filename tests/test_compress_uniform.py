"""`qpack compress --scheme uniform`: a grid of steps per matrix on the budget solver's menu, GPTQ on that grid."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from qpack.cli import main
from qpack.compress import CompressConfig, compress
from qpack.errors import BudgetError, QpackInputError
from qpack.rd.steps import DEFAULT_STEPS
from qpack.statedict import load


def _model(seed: int = 0):
    """An embedding, four linear layers of different scales with Hessians of uneven input scale, a norm."""
    g = torch.Generator().manual_seed(seed)
    sd = {"emb.weight": torch.randn(512, 64, generator=g) * 0.1, "norm.weight": torch.rand(64, generator=g) + 0.5}
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


def _scales(w: torch.Tensor, step: float) -> torch.Tensor:
    """Per-row steps written out independently: step * std(tensor), widened so that no weight needs |q| > 127."""
    return _fp16(torch.maximum(step * w.std(correction=0), w.abs().amax(dim=1, keepdim=True) / 127))


@pytest.mark.parametrize("bpp", [2.5, 4.0, 6.0])
def test_lands_under_and_within_half_a_percent(tmp_path, bpp):
    sd, hs = _model()
    budget = int(bpp * PARAMS / 8)
    res = compress(sd, tmp_path / "m.qpk", budget=budget, hessians=hs, **OPTS)
    size = (tmp_path / "m.qpk").stat().st_size
    assert size == res.bytes_total <= budget
    assert size >= 0.995 * budget, (size, budget)
    assert {t.scheme.removesuffix("+lqer") for t in res.tensors if t.name != "norm.weight"} <= {"uniform", "fp16"}


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
        for step in DEFAULT_STEPS:
            s = _scales(w, step)[r0:r1]
            q = got / s
            if torch.equal(q, torch.round(q)) and int(q.abs().max()) <= 127:
                ok.append(step)
        assert ok, t.name
        found.add(ok[0])
    assert len(found) > 1  # the solver used more than one step


@pytest.mark.parametrize("step", [0.4, 0.02])  # at 0.02 std most rows would clip: their step widens instead
def test_fixed_step_without_budget_is_gptq_on_that_grid_bit_exact(tmp_path, step):
    sd, hs = _model(2)
    compress(sd, tmp_path / "g.qpk", scheme="uniform", step=step, hessians=hs)
    compress(sd, tmp_path / "r.qpk", scheme="uniform", step=step)
    gptq, rtn = load(tmp_path / "g.qpk"), load(tmp_path / "r.qpk")
    for name, w in sd.items():
        if name == "norm.weight":
            assert torch.equal(rtn[name], _fp16(w))
            continue
        s = _scales(w, step)
        assert float((rtn[name] - w).abs().max()) <= float(s.max()) / 2 * 1.01  # nothing clipped
        # without Hessians: nearest level on the grid, computed here independently
        assert torch.equal(rtn[name], torch.round(w / s).clamp(-127, 127) * s), name
        if name in hs:  # with them: GPTQ on the same grid: same levels, different (better) choices
            q = gptq[name] / s
            assert torch.equal(q, torch.round(q)) and not torch.equal(gptq[name], rtn[name])
            d_g, d_r = (gptq[name] - w).double(), (rtn[name] - w).double()
            H = hs[name].double()
            assert torch.einsum("ij,jk,ik->", d_g, H, d_g) < torch.einsum("ij,jk,ik->", d_r, H, d_r)


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
    res = compress(sd, None, budget=int(0.6 * int2), hessians=hs, **OPTS)
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
                                  dict(scheme="uniform", step=0.5, group_size=32), dict(scheme="nope")])
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


def test_cli_fixed_step(tmp_path):
    sd, _ = _model()
    ckpt = tmp_path / "m.pt"
    torch.save(sd, ckpt)
    r = _cli(str(ckpt), "-o", str(tmp_path / "m.qpk"), "-q", "--scheme", "uniform", "--step", "0.4")
    assert r.exit_code == 0, r.stderr
    s = _scales(sd["l2.weight"], 0.4)
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
    # the embedding has no Hessian: GPTQ-lite widths there; widths asked for (bits or steps=()): GPTQ widths
    assert {t.scheme.removesuffix("+lqer") for t in auto.tensors if t.name.startswith("emb")} <= {"gptq_lite", "fp16"}
    for opts in (dict(steps=()), dict(bits=(3, 4, 5))):
        res = compress(sd, None, budget=budget, hessians=hs, **opts)
        assert {t.scheme.removesuffix("+lqer") for t in res.tensors if t.name.split("#")[0] in hs} <= {"gptq", "fp16"}

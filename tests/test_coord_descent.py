"""Coordinate descent after GPTQ (qpack.quant.coord_descent): against an independent brute-force reference,
never worse than GPTQ on its own objective, and wired through scheme uniform and compress."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qpack.compress import CompressConfig
from qpack.errors import QpackInputError
from qpack.quant import make_quantizer
from qpack.quant.coord_descent import CoordinateDescent, layer_error
from qpack.quant.gptq import GPTQ
from qpack.quant.uniform import uniform_scales


def _layer(rows: int, cols: int, seed: int = 0, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    return torch.randn(rows, cols, generator=g) * 0.1, X.T @ X / n


def reference_pass(W, H, S, Q, m, order, percdamp):
    """One pass in float64 by brute force: for each column in `order` and each row, the integer code in [-m, m]
    with the smallest tr(E H_d E^T), every other code as it stands (H_d = H + percdamp * mean(diag H) * I)."""
    W, H, S, Q = (np.array(a.numpy(), dtype=np.float64) for a in (W, H, S, Q))
    H = H + percdamp * np.mean(np.diag(H)) * np.eye(H.shape[0])
    levels = np.arange(-m, m + 1, dtype=np.float64)
    for j in order:
        for r in range(W.shape[0]):
            best, best_f = None, np.inf
            for lv in levels:
                e = W[r] - Q[r] * S[r]
                e[j] = W[r, j] - lv * S[r, 0]
                f = e @ H @ e
                if f < best_f:
                    best, best_f = lv, f
            Q[r, j] = best
    return Q


@pytest.mark.parametrize("blocksize", [128, 3])  # one block, and lazy updates across blocks
def test_one_pass_matches_brute_force_reference(blocksize):
    W, H = _layer(6, 10, seed=1)
    g = GPTQ(W, H)
    S = uniform_scales(W, 0.8, 4)
    Q = torch.round(W / S).clamp(-7, 7).to(torch.int8)  # round-to-nearest: far from optimal, so codes move
    got, info = CoordinateDescent(g, blocksize=blocksize).refine(Q, S, 7, passes=1)
    want = reference_pass(g.W, g.H, S, Q, 7, g.perm.tolist(), g.percdamp)
    assert np.array_equal(got.numpy().astype(np.float64), want)
    assert info["cd_changed"] == int((got != Q).sum()) > 0


def test_converged_codes_are_coordinatewise_optimal():
    """After passes until nothing moves, no single code can move by one level and lower the damped objective
    (checked by recomputing the objective for every +-1 move)."""
    W, H = _layer(6, 12, seed=2)
    g = GPTQ(W, H)
    S = uniform_scales(W, 0.6, 5)
    Q, _ = g.solve(S.to(torch.float16), 5)
    cd = CoordinateDescent(g)
    Qc, _ = cd.refine(Q, S, 15, passes=50)
    _, again = cd.refine(Qc, S, 15, passes=1)
    assert again["cd_changed"] == 0
    Hd = (g.H + g.percdamp * torch.diagonal(g.H).mean() * torch.eye(12)).double()
    f0 = layer_error(g.W, Qc, S, Hd)
    for r in range(6):
        for j in range(12):
            for d in (-1, 1):
                Qm = Qc.clone()
                Qm[r, j] = Qm[r, j] + d
                if abs(int(Qm[r, j])) <= 15:
                    assert layer_error(g.W, Qm, S, Hd) >= f0 * (1 - 1e-9)


@pytest.mark.parametrize("step", [0.3, 1.0, 2.5])
def test_never_worse_than_gptq_and_better_on_a_correlated_layer(step):
    W, H = _layer(64, 96, seed=3)
    g = GPTQ(W, H)
    S = uniform_scales(W, step, 8)
    Q, _ = g.solve(S.to(torch.float16), 8)
    cd = CoordinateDescent(g)
    errors = [cd.error(Q.float(), S)]
    Qc = Q
    for _ in range(3):
        Qc, _ = cd.refine(Qc, S, 127, passes=1)
        errors.append(cd.error(Qc.float(), S))
        assert int(Qc.abs().max()) <= 127 and Qc.dtype == Q.dtype
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 0.97 * errors[0]


def test_rate_term_lowers_the_codes_entropy():
    W, H = _layer(64, 96, seed=4)
    g = GPTQ(W, H)
    S = uniform_scales(W, 0.5, 8)
    Q, _ = g.solve(S.to(torch.float16), 8)
    from qpack.rd.grid_gptq import code_lengths

    def entropy(q):
        c = np.bincount(q.to(torch.int64).reshape(-1).numpy() + 127)
        p = c[c > 0] / c.sum()
        return float(-(p * np.log2(p)).sum())

    cd = CoordinateDescent(g)
    plain, _ = cd.refine(Q, S, 127, passes=2)
    rated, _ = cd.refine(Q, S, 127, passes=2, mu=0.3, lengths=code_lengths(Q, 127))
    assert entropy(rated) < entropy(plain) - 0.02
    assert cd.error(rated.float(), S) > cd.error(plain.float(), S)  # the rate is bought with distortion


def test_bad_arguments_are_one_line_errors():
    W, H = _layer(4, 8)
    g = GPTQ(W, H)
    S = uniform_scales(W, 1.0, 8)
    Q, _ = g.solve(S.to(torch.float16), 8)
    cd = CoordinateDescent(g)
    with pytest.raises(QpackInputError, match="passes"):
        cd.refine(Q, S, 127, passes=-1)
    with pytest.raises(QpackInputError, match="shape"):
        cd.refine(Q[:, :4], S, 127)
    with pytest.raises(QpackInputError, match="positive"):
        cd.refine(Q, torch.zeros_like(S), 127)
    with pytest.raises(QpackInputError, match="blocksize"):
        CoordinateDescent(g, blocksize=0)


def test_uniform_scheme_runs_the_passes_on_the_gptq_grid():
    W, H = _layer(48, 64, seed=5)
    plain = make_quantizer("uniform", 12, step=0.7).quantize(W, H)
    refined = make_quantizer("uniform", 12, step=0.7, cd=2).quantize(W, H)
    assert refined.params["cd_passes"] == 2 and refined.params["cd_changed"] > 0
    assert torch.equal(refined.scales, plain.scales)
    g = GPTQ(W, H)
    S = plain.scales.float()
    assert layer_error(g.W, refined.q.float(), S, H) < layer_error(g.W, plain.q.float(), S, H)
    # without a Hessian there is nothing to descend on: rounding on the grid, no cd params
    assert "cd_passes" not in make_quantizer("uniform", 12, step=0.7, cd=2).quantize(W).params
    with pytest.raises(QpackInputError, match="cd"):
        make_quantizer("uniform", 12, step=0.7, cd=-1)


def test_config_refuses_passes_without_steps():
    with pytest.raises(QpackInputError, match="cd passes"):
        CompressConfig(cd_passes=-2, budget=1000)
    with pytest.raises(QpackInputError, match="cd passes"):
        CompressConfig(cd_passes=1)  # no budget, no uniform scheme: nothing to refine
    with pytest.raises(QpackInputError, match="cd passes"):
        CompressConfig(cd_passes=1, budget=1000, steps=())  # widths only
    assert CompressConfig(cd_passes=2, budget=1000).cd_passes == 2


def test_compress_with_cd_passes_lowers_every_layers_error_on_the_same_grid(tmp_path):
    """compress with Hessians and cd_passes=2 runs two sweeps on every uniform step: on the same grid its codes have
    a lower layer error tr(E H E^T) than GPTQ's alone (the default, DEFAULT_CD_PASSES = 0), computed here from the
    loaded weights."""
    from qpack.artifact import read_artifact
    from qpack.compress import compress
    from qpack.rd.steps import DEFAULT_CD_PASSES, cd_passes_for
    from qpack.statedict import load

    assert CompressConfig().cd_passes is None and cd_passes_for(CompressConfig()) == DEFAULT_CD_PASSES == 0
    sd, hs = {}, {}
    for i in range(3):
        sd[f"l{i}.weight"], hs[f"l{i}.weight"] = _layer(96, 64, seed=10 + i)
    compress(sd, tmp_path / "cd.qpk", scheme="uniform", step=0.6, hessians=hs, cd_passes=2)
    compress(sd, tmp_path / "plain.qpk", scheme="uniform", step=0.6, hessians=hs)
    cd, plain = load(tmp_path / "cd.qpk"), load(tmp_path / "plain.qpk")
    art = read_artifact(tmp_path / "cd.qpk")
    for name, w in sd.items():
        H = hs[name].double()
        err = lambda wq: float(torch.einsum("ij,jk,ik->", (wq - w).double(), H, (wq - w).double()))  # noqa: E731
        assert err(cd[name]) < 0.99 * err(plain[name]), name
        assert art.quantized(name).params["cd_passes"] == 2
        assert "cd_passes" not in read_artifact(tmp_path / "plain.qpk").quantized(name).params

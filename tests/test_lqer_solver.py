"""LQER inside the budget solver: int2/int4 grouped factors stored and loaded exactly, their bytes inside the
budget, chosen where the error is low-rank and left out where its spectrum is flat; bad settings exit 2."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from click.testing import CliRunner

from qpack.artifact import TensorEntry, read_artifact, write_artifact
from qpack.cli import main
from qpack.codecs import make_codec
from qpack.compress import CompressConfig, compress
from qpack.errors import QpackInputError
from qpack.loader import export_loader
from qpack.quant import make_quantizer
from qpack.quant.lqer import error_svd, fit_factors, hessian_root

STEP = 2.0 ** -5  # an fp16-exact grid step: RTN at 3 bits reproduces a weight on this grid exactly


def deq(codes: torch.Tensor, scales: torch.Tensor, group: int | None) -> torch.Tensor:
    """q * scale written out here, independently of Quantized.dequantize."""
    cols = codes.shape[1]
    s = scales.float()
    idx = torch.arange(cols) // group if group else torch.zeros(cols, dtype=torch.long)
    return codes.float() * s[:, idx]


@pytest.fixture(scope="module")
def shipped_loader(tmp_path_factory):
    """The loader as it ships (minified, lzma-packed), imported from its file."""
    path = tmp_path_factory.mktemp("loader") / "qpack_load.py"
    path.write_bytes(export_loader(["zstd", "ans", "raw"]).shipped)
    spec = importlib.util.spec_from_file_location("qpack_load_lqer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("a_bits,b_bits,group", [(2, 4, 64), (4, 2, 128), (2, 2, 64), (4, 4, 32)])
def test_grouped_factors_round_trip_artifact_and_shipped_loader(tmp_path, shipped_loader, a_bits, b_bits, group):
    g = torch.Generator().manual_seed(a_bits * 10 + b_bits)
    w = torch.randn(96, 200, generator=g)
    main_q = make_quantizer("rtn", 3).quantize(w)
    err = w - main_q.dequantize()
    qa, qb = fit_factors(err, 8, a_bits, b_bits, group)
    assert (qa.bits, qb.bits, qb.group_size) == (a_bits, b_bits, group)
    assert int(qa.q.abs().max()) <= 2 ** (a_bits - 1) - 1 and int(qb.q.abs().max()) <= 2 ** (b_bits - 1) - 1
    assert qb.scales.shape == (8, -(-200 // group))  # one scale per group of B's columns, last group partial
    assert torch.unique(qa.scales).numel() == 1  # A: one scale for the whole factor
    c = make_codec("zstd", {})
    path = tmp_path / "m.qpk"
    write_artifact(path, [TensorEntry("w", main_q, codec=c, scale_codec=c, lowrank=(qa, qb))])
    want = deq(main_q.q, main_q.scales, None) + deq(qa.q, qa.scales, None) @ deq(qb.q, qb.scales, group)
    art = read_artifact(path)
    a2, b2 = art.lowrank("w")
    assert (a2.bits, b2.bits, b2.group_size) == (a_bits, b_bits, group)
    assert torch.equal(art.tensor("w"), want)
    assert torch.equal(shipped_loader.load(str(path))["w"], want)
    assert art.section_bytes("w")["lowrank"] > 0


def test_factors_reduce_a_low_rank_error_far_more_than_a_flat_one():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(128, 2, generator=g) @ torch.randn(2, 128, generator=g)
    flat = torch.randn(128, 128, generator=g)
    for err, most in ((low, 0.3), (flat, 1.0)):
        qa, qb = fit_factors(err, 4, 4, 4, 64)
        rel = float((err - qa.dequantize() @ qb.dequantize()).norm() / err.norm())
        assert rel < most
    qa, qb = fit_factors(flat, 4, 4, 4, 64)
    assert float((flat - qa.dequantize() @ qb.dequantize()).norm() / flat.norm()) > 0.9


def grid_weights(seed: int, low_rank: bool, n: int = 12) -> dict[str, torch.Tensor]:
    """Weights on RTN's 3-bit grid (each row's max |w| is 3 steps, in column 0) plus a perturbation under half a
    step that leaves column 0 alone: 3-bit RTN returns the grid, so its error is exactly the perturbation,
    rank 2 (`low_rank`) or independent per weight (a flat spectrum)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        grid = torch.randint(-3, 4, (64, 64), generator=g).float()
        grid[:, 0] = 3.0
        if low_rank:
            u, v = torch.rand(64, 2, generator=g) * 2 - 1, torch.rand(2, 64, generator=g) * 2 - 1
            p = u @ v / 2 * 0.45 * STEP
        else:
            p = (torch.rand(64, 64, generator=g) * 2 - 1) * 0.45 * STEP
        p[:, 0] = 0.0
        out[f"layer{i}.weight"] = grid * STEP + p
    return out


# squared-error allocation (datafree_loss mse) keeps the budget arithmetic of these constructed cases plain
COMMON = dict(scheme="rtn", fp16_candidate=False, codecs=("zstd",), datafree_loss="mse")


def two_upgrades(sd) -> int:
    """A budget that holds every tensor at 3 bits plus two of them at 4 bits (and a few bytes): the bytes an
    LQER correction would take buy a width upgrade instead."""
    size = lambda bits: compress(sd, None, CompressConfig(budget=10**7, bits=(bits,), lqer="off", **COMMON),  # noqa: E731
                                 dry_run=True).bytes_total
    at3, at4 = size(3), size(4)
    return at3 + 2 * (at4 - at3) // len(sd) + 30


def squared_error(sd, path) -> float:
    art = read_artifact(path)
    return sum(float((sd[n] - art.tensor(n)).double().square().sum()) for n in sd)


def run_both(sd, budget, tmp_path):
    """compress with LQER in the solver and without, at one budget: (result, artifact path) of each."""
    path, plain = tmp_path / "m.qpk", tmp_path / "plain.qpk"
    r = compress(sd, path, CompressConfig(budget=budget, bits=(3, 4), lqer="on", lqer_ranks=(2, 4), **COMMON))
    p = compress(sd, plain, CompressConfig(budget=budget, bits=(3, 4), lqer="off", **COMMON))
    assert r.bytes_total <= budget and p.bytes_total <= budget
    art = read_artifact(path)
    with_factors = [n for n in sd if art.lowrank(n) is not None]
    assert [t.name for t in r.tensors if t.scheme.endswith("+lqer")] == with_factors
    return (r, path), (p, plain), with_factors


def upgraded(result) -> set[str]:
    return {t.name for t in result.tensors if t.bits == 4}


@pytest.mark.parametrize("low_rank", [True, False])
def test_solver_gives_up_width_upgrades_for_lqer_only_where_the_error_is_low_rank(tmp_path, low_rank):
    sd = grid_weights(3, low_rank)
    (r, path), (p, plain), with_factors = run_both(sd, two_upgrades(sd) + 1000, tmp_path)
    assert upgraded(p)  # without LQER the solver spends the bytes on width upgrades
    if low_rank:
        assert len(upgraded(r)) < len(upgraded(p)) and len(with_factors) >= 3
        assert squared_error(sd, path) < 0.9 * squared_error(sd, plain)
    else:  # corrections only in bytes no upgrade could use
        assert upgraded(r) == upgraded(p)


def test_flat_error_gets_no_lqer_when_upgrades_take_the_bytes(tmp_path):
    sd = grid_weights(3, False)
    (r, path), (p, plain), with_factors = run_both(sd, two_upgrades(sd), tmp_path)
    assert len(upgraded(p)) == 2 and upgraded(r) == upgraded(p)
    assert with_factors == []
    assert squared_error(sd, path) == squared_error(sd, plain)


def model_with_low_rank_errors(seed: int) -> dict[str, torch.Tensor]:
    """Twelve 64x64 grid weights with rank-2 errors at 3 bits, a 512x64 one that is split into row blocks, and
    a norm that passes through."""
    sd = grid_weights(seed, True)
    big = grid_weights(seed + 1, True, n=8)
    sd["emb.weight"] = torch.cat([big[f"layer{i}.weight"] for i in range(8)], 0)
    sd["norm.weight"] = torch.ones(64)
    return sd


@pytest.mark.parametrize("extra", [900, 2500, 6000])
def test_lqer_bytes_are_inside_the_budget(tmp_path, extra):
    sd = model_with_low_rank_errors(11)
    at3 = compress(sd, None, CompressConfig(budget=10**7, bits=(3,), chunk_numel=4096, lqer="off", **COMMON),
                   dry_run=True).bytes_total
    budget = at3 + extra
    path = tmp_path / "m.qpk"
    r = compress(sd, path, CompressConfig(budget=budget, bits=(3, 4, 5), lqer="on", chunk_numel=4096,
                                          lqer_ranks=(2, 4), **COMMON))
    size = path.stat().st_size
    assert size == r.bytes_total <= budget
    assert size >= 0.995 * budget
    art = read_artifact(path)
    factor_bytes = sum(art.section_bytes(n)["lowrank"] for n in art.names() if art.entry(n)["kind"] == "quant")
    reported = {t.name: t.bytes for t in r.tensors}
    for n in art.names():  # the report's bytes per entry are the stored sections, factors included
        assert reported[n] == sum(art.section_bytes(n).values())
    assert factor_bytes > 0
    split = [n for n in art.names() if n.startswith("emb.weight#rows")]
    assert len(split) == 8
    if art.lowrank(split[0]) is not None:  # one factorization of the whole tensor: B shared by every block
        assert all(torch.equal(art.lowrank(split[0])[1].q, art.lowrank(s)[1].q) for s in split)


@pytest.mark.parametrize("opts,needle", [
    (dict(lqer="auto", lqer_ranks=(0,)), "--lqer-ranks"),
    (dict(lqer="auto", lqer_ranks=(4, -2)), "--lqer-ranks"),
    (dict(lqer="auto", lqer_bits=(3,)), "--lqer-bits"),
    (dict(lqer="auto", lqer_bits=(8,)), "--lqer-bits"),
    (dict(lqer="auto", lqer_group=0), "--lqer-group"),
    (dict(lqer="maybe"), "--lqer"),
])
def test_bad_lqer_config(opts, needle):
    opts = {"budget": 10**6, **opts}
    with pytest.raises(QpackInputError, match=needle):
        CompressConfig(**opts)


def test_bad_factor_arguments():
    e = torch.randn(8, 8)
    for rank, a, b in ((0, 2, 4), (-1, 2, 4), (2, 3, 4), (2, 2, 8)):
        with pytest.raises(QpackInputError):
            fit_factors(e, rank, a, b, 4)


@pytest.mark.parametrize("args,needle", [
    (["--lqer", "auto", "--lqer-ranks", "0"], "--lqer-ranks"),
    (["--lqer", "auto", "--lqer-bits", "2,3"], "--lqer-bits"),
    (["--lqer", "auto", "--lqer-ranks", "4,x"], "--lqer-ranks"),
    (["--lqer", "auto"], "needs --budget"),
    (["--lqer", "auto", "--lqer-rank", "2", "--lqer-top", "1"], "drop --lqer-rank"),
    (["--lqer", "on"], "needs --budget"),
    (["--lqer", "never"], "--lqer"),
])
def test_cli_bad_lqer_flags_exit_2_and_write_nothing(tmp_path, args, needle):
    ckpt = tmp_path / "m.pt"
    torch.save({"w": torch.randn(64, 64)}, ckpt)
    out = tmp_path / "m.qpk"
    budget = [] if "needs" in needle else ["--budget", "100000"]
    result = CliRunner().invoke(main, ["compress", str(ckpt), "-o", str(out), "-q", *budget, *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qpack: error: ") and needle in lines[0], result.stderr
    assert not out.exists()


def test_cli_lqer_on_compresses_under_budget_without_data(tmp_path):
    g = torch.Generator().manual_seed(5)
    ckpt = tmp_path / "m.pt"
    torch.save({"w": torch.randn(128, 64, generator=g) * 0.1 + torch.randn(128, 2, generator=g) @ torch.randn(
        2, 64, generator=g)}, ckpt)
    out = tmp_path / "m.qpk"
    # widths only (--scheme gptq_lite): without data the default menu also holds per-row steps, which code this
    # low-rank matrix well enough that the solver has no use for a factor at this budget
    result = CliRunner().invoke(main, ["compress", str(ckpt), "-o", str(out), "-q", "--budget", "3500",
                                       "--scheme", "gptq_lite", "--lqer", "on", "--lqer-ranks", "2,4", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert out.stat().st_size <= 3500
    assert read_artifact(out).lowrank("w") is not None


def test_hessian_whitened_svd_removes_more_curvature_weighted_error():
    g = torch.Generator().manual_seed(9)
    err = torch.randn(48, 32, generator=g, dtype=torch.float64)
    x = torch.randn(256, 32, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 32, dtype=torch.float64)
    h = x.T @ x  # a skewed curvature: a few input columns matter far more than the rest
    root = hessian_root(h, 32)
    assert root is not None and torch.allclose(root @ root.T, h + 0.01 * torch.diagonal(h).mean() * torch.eye(32,
                                                                                 dtype=torch.float64))
    hq = root @ root.T
    weighted = lambda e: float(torch.trace(e @ hq @ e.T))  # noqa: E731
    for svd in (error_svd(err), error_svd(err, root)):
        U, S, Vh = svd
        assert torch.allclose(U @ torch.diag(S) @ Vh, err, atol=1e-10)
    r = 4
    plain = [m[..., :r] if i == 0 else m[:r] for i, m in enumerate(error_svd(err))]
    white = [m[..., :r] if i == 0 else m[:r] for i, m in enumerate(error_svd(err, root))]
    rest_plain = err - plain[0] @ torch.diag(plain[1]) @ plain[2]
    rest_white = err - white[0] @ torch.diag(white[1]) @ white[2]
    assert weighted(rest_white) < 0.9 * weighted(rest_plain)
    assert hessian_root(h, 31) is None and hessian_root(None, 32) is None


def test_lqer_default_is_on_with_calibration_off_without_and_yields_to_the_fixed_mode(tmp_path):
    sd = grid_weights(4, True, n=4)
    budget = two_upgrades(sd) + 1000
    # identity Hessians: calibration data whose inputs are white, so the Hessian-weighted error is the plain one
    eye = {n: torch.eye(64) * 64 for n in sd}
    on = compress(sd, tmp_path / "d.qpk", CompressConfig(budget=budget, bits=(3, 4), lqer="on", **COMMON))
    free = compress(sd, tmp_path / "o.qpk", CompressConfig(budget=budget, bits=(3, 4), **COMMON))  # the default
    calib = compress(sd, tmp_path / "c.qpk", CompressConfig(budget=budget, bits=(3, 4), **COMMON), hessians=eye)
    off = compress(sd, tmp_path / "x.qpk", CompressConfig(budget=budget, bits=(3, 4), lqer="off", **COMMON),
                   hessians=eye)
    fixed = compress(sd, tmp_path / "f.qpk", CompressConfig(budget=budget, bits=(3, 4), lqer_rank=1, lqer_top=1,
                                                            **COMMON))
    lqer = lambda r: [t.name for t in r.tensors if t.scheme.endswith("+lqer")]  # noqa: E731
    assert lqer(on) and lqer(calib) and not lqer(free) and not lqer(off) and len(lqer(fixed)) == 1
    assert calib.bytes_total <= budget
    assert read_artifact(tmp_path / "f.qpk").lowrank(lqer(fixed)[0])[0].bits == 8  # the fixed mode's int8 factors
    nobudget = compress(sd, tmp_path / "n.qpk", CompressConfig(**COMMON), hessians=eye)  # fixed widths: no trade
    assert not lqer(nobudget)

"""Data-free defaults (issue 10, item 4): gptq_lite's outlier-weighted clip search keeps a weight that matters,
the data-free loss helper, and the no-Hessian default compress uses is the one the README names."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from qpack.compress import CompressConfig, _loss, _schemes_for, compress
from qpack.errors import QpackInputError
from qpack.quant.base import make_quantizer
from qpack.quant.datafree import DEFAULT_DATAFREE_LOSS, EMBED_WEIGHT, datafree_loss, reference_ms
from qpack.quant.gptq_lite import DEFAULT_PROTECT_SIGMA, DEFAULT_TAIL_WEIGHT, GPTQLite

ROOT = Path(__file__).resolve().parents[1]


def _outlier_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """A Gaussian layer (64 x 256) whose row 5 holds one 8-sigma weight at column 17, and inputs (512, 256)
    whose channel 17 is a massive activation (30x the others), as in pretrained LMs' super weights."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=g)
    w[5, 17] = 8.0
    x = torch.randn(512, 256, generator=g)
    x[:, 17] *= 30.0
    return w, x, 5, 17


def _plain_mse_scales(w: torch.Tensor, bits: int, ratios: list[float]) -> torch.Tensor:
    """Reference for the old search, written independently: per row, the ratio of absmax whose fp16 scale
    gives the smallest squared error (first on ties)."""
    m = 2 ** (bits - 1) - 1
    out = torch.empty(w.shape[0], 1)
    for i, row in enumerate(w):
        best, best_s = float("inf"), None
        for r in ratios:
            s = float(torch.tensor(row.abs().max().item() * r / m).to(torch.float16))
            err = float(((torch.clamp(torch.round(row / s), -m, m) * s - row) ** 2).sum())
            if err < best:
                best, best_s = err, s
        out[i, 0] = best_s
    return out


def test_default_keeps_an_outlier_that_matters():
    w, x, row, col = _outlier_layer()
    bits = 3
    old = make_quantizer("gptq_lite", bits, protect_sigma=None, tail_weight=0.0).quantize(w)
    new = make_quantizer("gptq_lite", bits).quantize(w)
    m = 2 ** (bits - 1) - 1
    # the plain MSE search cuts the 8-sigma weight by more than half its step; the default keeps it within
    # half a step (what rounding alone costs any weight)
    s_old, s_new = float(old.scales[row, 0]), float(new.scales[row, 0])
    assert 8.0 - s_old * m > 0.5 * s_old
    assert abs(float(new.dequantize()[row, col]) - 8.0) <= 0.5 * s_new * (1 + 1e-3)
    assert s_new > s_old
    # each guard alone keeps it too: the protection (tail weight 0) and the tail weighting (nothing protected)
    for params in ({"tail_weight": 0.0}, {"protect_sigma": None}):
        one = make_quantizer("gptq_lite", bits, **params).quantize(w)
        s_one = float(one.scales[row, 0])
        assert abs(float(one.dequantize()[row, col]) - 8.0) <= 0.5 * s_one * (1 + 1e-3), params
    # and on the inputs that make that weight matter, keeping it gives the row a smaller output error
    err_old = float(((w[row] - old.dequantize()[row]) @ x.T).square().sum())
    err_new = float(((w[row] - new.dequantize()[row]) @ x.T).square().sum())
    assert err_new < 0.75 * err_old


def test_default_still_clips_a_gaussian_tail_when_it_pays():
    # no outliers: the weighted search may still trim the tail at 3 bits, and it lowers the plain MSE
    w = torch.randn(128, 512, generator=torch.Generator().manual_seed(1))
    q = make_quantizer("gptq_lite", 3).quantize(w)
    rtn = make_quantizer("rtn", 3).quantize(w)
    assert (q.scales.float() < rtn.scales.float()).float().mean() > 0.5
    assert float((q.dequantize() - w).square().sum()) < float((rtn.dequantize() - w).square().sum())


def test_protect_sigma_none_is_the_plain_mse_search():
    w, _, _, _ = _outlier_layer(2)
    ratios = [float(r) for r in torch.linspace(1.0, 0.8, 41)]
    got = make_quantizer("gptq_lite", 4, protect_sigma=None, tail_weight=0.0, clip_max_bits=8).quantize(w).scales.float()
    assert torch.equal(got, _plain_mse_scales(w, 4, ratios))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "1", True])
def test_bad_protect_sigma_is_refused(bad):
    with pytest.raises(QpackInputError, match="protect_sigma"):
        make_quantizer("gptq_lite", 4, protect_sigma=bad).quantize(torch.randn(8, 8))


def test_tail_weight_clips_less_at_high_widths():
    # Gaussian rows: at 3 bits both searches trim the tail hard; at 8 bits the tail-weighted one trims less
    # than half as much as the plain MSE search
    w = torch.randn(128, 512, generator=torch.Generator().manual_seed(6))

    def trim(bits: int, tail_weight: float) -> float:
        s = make_quantizer("gptq_lite", bits, protect_sigma=None, tail_weight=tail_weight,
                           clip_max_bits=8).quantize(w).scales
        return float((1 - s.float() / make_quantizer("rtn", bits).quantize(w).scales.float()).mean())

    assert trim(3, 1.0) > 0.15 and trim(3, 0.0) > 0.15
    assert trim(8, 1.0) < 0.5 * trim(8, 0.0)


def test_no_clipping_above_clip_max_bits():
    w, _, _, _ = _outlier_layer(7)
    for bits in (7, 8):
        got = make_quantizer("gptq_lite", bits).quantize(w)
        assert torch.equal(got.scales, make_quantizer("rtn", bits).quantize(w).scales)
    assert not torch.equal(make_quantizer("gptq_lite", 6).quantize(w).scales,
                           make_quantizer("rtn", 6).quantize(w).scales)


@pytest.mark.parametrize("bad", [-0.5, float("inf"), None])
def test_bad_tail_weight_is_refused(bad):
    with pytest.raises(QpackInputError, match="tail_weight"):
        make_quantizer("gptq_lite", 4, tail_weight=bad).quantize(torch.randn(8, 8))


def test_protect_sigma_zero_never_clips():
    w, _, _, _ = _outlier_layer(5)
    q = make_quantizer("gptq_lite", 3, protect_sigma=0.0).quantize(w)
    err = (q.dequantize() - w).abs()
    assert bool((err <= q.scales.float() * 0.5 * (1 + 1e-3)).all())


def test_datafree_loss_values():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 32, generator=g) * 0.2
    wq = w + 0.01 * torch.randn(16, 32, generator=g)
    se = float(((w - wq).double() ** 2).sum())
    assert datafree_loss(w, wq, "mse") == pytest.approx(0.5 * se, rel=1e-9)
    assert datafree_loss(w, wq, "relative") == pytest.approx(0.5 * se / float((w.double() ** 2).mean()), rel=1e-9)
    rel = datafree_loss(w, wq, "relative")
    assert datafree_loss(w, wq, "relative+embed", "blocks.0.attn.q.weight") == rel
    for name in ("tok_emb.weight", "token_embd.weight", "transformer.wte.weight", "lm_head.weight"):
        assert datafree_loss(w, wq, "relative+embed", name) == pytest.approx(EMBED_WEIGHT * rel, rel=1e-12)
    # with the matrices' reference mean square, the embedding's error is counted in its units
    assert datafree_loss(w, wq, "relative+embed", "tok_emb.weight", ref_ms=0.25) == pytest.approx(
        EMBED_WEIGHT * 0.5 * se / 0.25, rel=1e-9)
    assert datafree_loss(w, wq, "relative+embed", "blocks.0.mlp.fc.weight", ref_ms=0.25) == rel
    tensors = {"tok_emb.weight": torch.full((4, 4), 9.0), "a.weight": torch.full((4, 4), 1.0),
               "b.weight": torch.full((4, 4), 2.0), "c.weight": torch.full((4, 4), 3.0)}
    assert reference_ms(tensors) == 4.0  # median of 1, 4, 9 over the non-embedding tensors
    # in a run with neither Hessians nor Fisher compress's loss is the data-free one
    assert _loss(w, wq, None, "hessian", datafree="relative") == datafree_loss(w, wq, "relative")
    with pytest.raises(QpackInputError, match="data-free loss"):
        CompressConfig(datafree_loss="fisher")


def test_model_loss_is_the_high_rate_error_of_the_stored_steps():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 64, generator=g) * 0.3
    q = make_quantizer("uniform", 8, step=0.5, rows="std").quantize(w)
    wq = q.dequantize().reshape(w.shape)
    s = q.scales.double().reshape(-1, 1)
    modeled = float((s ** 2 / 12).expand(16, 64).sum())  # every weight's error uniform on +-step/2
    measured = float(((w - wq).double() ** 2).sum())
    ms = float((w.double() ** 2).mean())
    got = datafree_loss(w, wq, "model+embed", "blocks.0.attn.q.weight", payload=q)
    assert got == pytest.approx(0.5 * max(modeled, measured) / ms, rel=1e-9)
    # stored steps that understate the error (as a clip's do, which cuts weights): the measured error counts
    clipped = make_quantizer("rtn", 2).quantize(w)
    cq = clipped.dequantize().reshape(w.shape)
    cut = float(((w - cq).double() ** 2).sum())
    small = dataclasses.replace(clipped, scales=clipped.scales * 0.01)
    assert datafree_loss(w, cq, "model+embed", "x.weight", payload=small) == pytest.approx(0.5 * cut / ms, rel=1e-9)
    # an fp16 block (a tensor, not Quantized) and the embedding's weighting are relative+embed's
    assert datafree_loss(w, wq, "model+embed", "x.weight") == datafree_loss(w, wq, "relative+embed", "x.weight")
    assert datafree_loss(w, wq, "model+embed", "tok_emb.weight", ref_ms=0.25, payload=q) == pytest.approx(
        EMBED_WEIGHT * 0.5 * max(modeled, measured) / 0.25, rel=1e-9)


def test_model_loss_gives_both_tensors_one_row_relative_step(tmp_path):
    # a Gaussian and a heavy-tailed (Laplace) tensor of different scales: under the modeled loss equal marginal
    # loss per byte is, at high rate, one step in units of each row's std for both (SDClip's one k)
    from qpack.artifact import read_artifact

    g = torch.Generator().manual_seed(6)
    u = torch.rand(128, 256, generator=g) - 0.5
    sd = {"a.weight": torch.randn(128, 256, generator=g), "b.weight": -0.1 * u.sign() * torch.log1p(-2 * u.abs())}
    cfg = CompressConfig(budget=int(4.0 * 2 * 128 * 256 / 8), scheme="uniform", fp16_candidate=False,
                         datafree_loss="model+embed", chunk_numel=1 << 20)
    compress(dict(sd), tmp_path / "m.qpk", cfg)
    art = read_artifact(tmp_path / "m.qpk")
    step = {}
    for n, w in sd.items():
        q = art.quantized(n)
        step[n] = (q.scales.float().reshape(-1) / w.std(dim=1, correction=0)).median()
    assert float(step["a.weight"]) == pytest.approx(float(step["b.weight"]), rel=0.10), step


def test_relative_loss_allocates_by_scale_free_error():
    # two tensors of one distribution, one 10x larger: the mse loss spends more bits on the large one, the
    # relative loss gives both the same width
    g = torch.Generator().manual_seed(4)
    sd = {"a.weight": torch.randn(64, 128, generator=g), "b.weight": 10 * torch.randn(64, 128, generator=g)}
    widths = {}
    for mode in ("mse", "relative"):
        r = compress(dict(sd), None, CompressConfig(budget=9000, fp16_candidate=False, datafree_loss=mode,
                                                    scheme="gptq_lite"),
                     dry_run=True)
        widths[mode] = {t.name: t.bits for t in r.tensors}
    assert widths["mse"]["b.weight"] > widths["mse"]["a.weight"]
    assert widths["relative"]["b.weight"] == widths["relative"]["a.weight"]


def test_no_hessian_default_is_what_the_readme_says():
    cfg = CompressConfig()
    assert _schemes_for(cfg, False) == [("gptq_lite", {})]
    assert GPTQLite.defaults["protect_sigma"] == DEFAULT_PROTECT_SIGMA
    assert cfg.datafree_loss == DEFAULT_DATAFREE_LOSS
    readme = (ROOT / "README.md").read_text()
    para = re.search(r"\*\*Data-free\.\*\*(.*?)\n\n", readme, re.S)
    assert para, "README has no Data-free paragraph"
    text = " ".join(para.group(1).split())  # the paragraph with its line breaks as spaces
    said = re.search(r"default: `gptq_lite` protecting weights beyond ([0-9.]+) sigma with tail weight ([0-9.]+), "
                     r"and the `([\w+]+)` data-free loss", text)
    assert said, "the Data-free paragraph does not state the default"
    assert float(said.group(1)) == DEFAULT_PROTECT_SIGMA
    assert float(said.group(2)) == DEFAULT_TAIL_WEIGHT
    assert said.group(3) == DEFAULT_DATAFREE_LOSS


def test_bisect_step_finds_the_finest_step_that_fits():
    from qpack.rd.common_step import bisect_step, fill_steps

    size = lambda s: 1000 / s  # noqa: E731  (falls as the step grows)
    got = bisect_step(size, 400, 0.1, 10.0)
    assert size(got) <= 400 and got == pytest.approx(2.5, rel=1e-3)  # 1000 / 2.5 = 400
    assert bisect_step(size, 10_000, 0.1, 10.0) == 0.1  # the finest fits
    assert bisect_step(size, 50, 0.1, 10.0) == 10.0  # nothing fits: the coarsest
    assert fill_steps(1.0) == pytest.approx([2 ** (-2 / 32), 2 ** (-1 / 32), 1.0])


def test_common_loss_puts_every_block_on_one_step(tmp_path):
    # a Gaussian and a Laplace matrix, and an embedding with several times their mean square: every matrix block
    # is stored at one step in units of its rows' std (to within the fill's 2/32 octave), the embedding's finer by
    # (its mean square / the matrices' median) ** COMMON_EMBED_EXPONENT; the file fills the budget
    from qpack.artifact import read_artifact
    from qpack.quant.datafree import COMMON_EMBED_EXPONENT

    g = torch.Generator().manual_seed(8)
    u = torch.rand(256, 256, generator=g) - 0.5
    sd = {"a.weight": 2 ** 0.5 * torch.randn(256, 256, generator=g), "b.weight": -u.sign() * torch.log1p(-2 * u.abs()),
          "tok_emb.weight": 4.0 * torch.randn(512, 128, generator=g)}
    ms = {n: float(t.double().square().mean()) for n, t in sd.items()}
    ref = sorted([ms["a.weight"], ms["b.weight"]])[1]  # the median of two: the upper one
    divisor = (ms["tok_emb.weight"] / ref) ** COMMON_EMBED_EXPONENT
    budget = int(3.5 * sum(t.numel() for t in sd.values()) / 8)
    cfg = CompressConfig(budget=budget, scheme="uniform", datafree_loss="common", chunk_numel=16384)
    r = compress(dict(sd), tmp_path / "m.qpk", cfg)
    assert 0.99 * budget <= r.bytes_total <= budget
    art = read_artifact(tmp_path / "m.qpk")
    steps = {}
    for t in r.tensors:
        name, _, rows = t.name.partition("#rows")
        r0, r1 = (int(x) for x in rows.split("-")) if rows else (0, sd[name].shape[0])
        w = sd[name][r0:r1]
        s = float((art.quantized(t.name).scales.float().reshape(-1) / w.std(dim=1, correction=0)).median())
        steps.setdefault(name, []).append(s)
    mats = steps["a.weight"] + steps["b.weight"]
    spread = 2 ** (2 / 32) * 1.01  # the fill's range, and fp16 rounding of the scales
    assert max(mats) / min(mats) <= spread, steps
    assert divisor > 2.5  # the embedding's mean square is 8x the matrices': a real offset
    for s in steps["tok_emb.weight"]:
        assert max(mats) / spread <= s * divisor <= max(mats) * 1.01, (steps, divisor)


def test_common_loss_needs_uniform_steps():
    sd = {"a.weight": torch.randn(64, 128)}
    with pytest.raises(QpackInputError, match="common"):
        compress(sd, None, CompressConfig(budget=5000, datafree_loss="common", scheme="gptq_lite"))


def _tied_lm(seed: int = 0, gain: bool = True) -> dict[str, torch.Tensor]:
    """A Llama-style tied embedding and two block matrices; `gain`: a final norm with a spread of gains."""
    g = torch.Generator().manual_seed(seed)
    d = 64
    sd = {"token_embd.weight": torch.randn(1024, d, generator=g) * 0.05,
          "blk.0.ffn_up.weight": torch.randn(256, d, generator=g) * 0.1,
          "blk.0.ffn_down.weight": torch.randn(d, 256, generator=g) * 0.1,
          "blk.0.ffn_norm.weight": 1 + 0.1 * torch.randn(d, generator=g)}
    if gain:
        sd["output_norm.weight"] = torch.exp(1.2 * torch.randn(d, generator=g))
    return sd


def test_head_columns_finds_the_final_norm_before_a_tied_head():
    from qpack.quant.datafree import head_columns

    sd = _tied_lm()
    quantized = ["token_embd.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"]
    got = head_columns(sd, quantized)
    assert list(got) == ["token_embd.weight"]
    assert torch.equal(got["token_embd.weight"], sd["output_norm.weight"].double().abs())
    # Hugging Face names, with the tied alias in the state dict (not stored): found too
    hf = {"model.embed_tokens.weight": sd["token_embd.weight"], "model.norm.weight": sd["output_norm.weight"],
          "lm_head.weight": sd["token_embd.weight"]}
    assert list(head_columns(hf, ["model.embed_tokens.weight"])) == ["model.embed_tokens.weight"]
    # none: no final gain; an untied head stored beside the embedding; a gain that is the same for every feature
    assert head_columns(_tied_lm(gain=False), quantized) == {}
    untied = {**sd, "output.weight": torch.randn(1024, 64)}
    assert head_columns(untied, [*quantized, "output.weight"]) == {}
    assert head_columns({**sd, "output_norm.weight": torch.ones(64)}, quantized) == {}
    assert head_columns({**sd, "output_norm.weight": torch.rand(32)}, quantized) == {}  # not one per column


def test_column_factors_are_the_equal_marginal_loss_profile():
    from qpack.quant.uniform import col_factors

    g = torch.tensor([1.0, 4.0, 16.0, 0.25])
    f = col_factors(g)
    geo = float(torch.exp(torch.log(g).mean()))
    assert torch.allclose(f, (g / geo) ** -0.5, rtol=1e-3)  # fp16-rounded
    assert torch.equal(f, f.half().float())
    assert float(col_factors(torch.tensor([1.0, 1e9])).max()) == 8.0  # within 1/8..8


def test_datafree_head_is_column_scaled_and_its_output_error_falls(tmp_path):
    # The tied head computes logits = E @ (gamma * z): its output error is sum_j gamma_j^2 * ||E_j - Eq_j||^2 for
    # white z. At one budget, the run that sees the final norm's gain must have the smaller head output error; the
    # same weights with the gain under a name nothing recognises give the plain grid.
    from qpack.artifact import read_artifact

    sd = _tied_lm()
    hidden = {k if k != "output_norm.weight" else "blk.0.attn_norm.weight": v for k, v in sd.items()}
    numel = sum(t.numel() for t in sd.values())
    budget = int(numel * 3.5 / 8) + 4000
    errs, cols = {}, {}
    for label, weights in (("gain", sd), ("hidden", hidden)):
        path = tmp_path / f"{label}.qpk"
        rep = compress(weights, path, budget=budget)
        assert rep.bytes_total <= budget
        art = read_artifact(path)
        cols[label] = [e["name"] for e in art.entries if "col_scale" in e]
        emb = qpack_load(path)["token_embd.weight"]
        gamma2 = sd["output_norm.weight"].double() ** 2
        errs[label] = float(((emb.double() - sd["token_embd.weight"].double()) ** 2 * gamma2).sum())
    assert cols["hidden"] == []
    assert cols["gain"] and all(n.startswith("token_embd.weight") for n in cols["gain"])
    assert errs["gain"] < 0.8 * errs["hidden"], errs


def qpack_load(path):
    import qpack

    return qpack.load(path)

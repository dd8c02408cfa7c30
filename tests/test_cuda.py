"""Every device path on CUDA against the same work on the CPU (`pytest -m cuda`; skipped without a GPU).

Elementwise work (RTN codes, dequantization, loading) must match the CPU exactly; work with reductions or
long chains of float updates (std, clip-search MSE, the GPTQ sweep, bf16 eval) may flip a code sitting on a
rounding boundary, so it must agree on nearly every code and on the error it leaves.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qpack
from qpack.compress import compress
from qpack.eval.sliding import sliding_nll
from qpack.hessian import calibration_batches, collect_hessians
from qpack.quant import make_quantizer
from qpack.quant.gptq import GPTQ, RateDistortionRounding, quantize_widths
from qpack.quant.lqer import fit_lqer
from qpack.models.gpt import build_from_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
TINY_GPT = {"arch": "gpt", "vocab_size": 96, "n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2}


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """TF32 would round matmul inputs to 10 mantissa bits; compare against the CPU in full fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def layer(rows=96, cols=160, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    X = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 0.2 * torch.randn(cols, cols, generator=g))
    X[:, 3] = 0  # a dead input
    return W, X, X.T @ X / n


def agree(a, b) -> float:
    """Fraction of equal codes of two Quantized."""
    return float((a.q.cpu() == b.q.cpu()).double().mean())


def layer_error(W, X, q) -> float:
    return float(torch.linalg.norm((W.double() - q.dequantize().cpu().double()) @ X.double().T))


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("bits", [3, 6])
def test_rtn_on_cuda_equals_cpu_exactly(bits, group_size):
    W, _, _ = layer()
    cpu = make_quantizer("rtn", bits, group_size).quantize(W)
    gpu = make_quantizer("rtn", bits, group_size).quantize(W.to(CUDA))
    assert gpu.q.device.type == "cuda" and gpu.scales.device.type == "cuda"
    assert torch.equal(gpu.q.cpu(), cpu.q) and torch.equal(gpu.scales.cpu(), cpu.scales)
    assert torch.equal(gpu.dequantize().cpu(), cpu.dequantize())


@pytest.mark.parametrize("name,params", [("gptq_lite", {}), ("sdclip", {}), ("sdclip", {"k": 4.0})])
@pytest.mark.parametrize("bits", [4, 6])
def test_data_free_quantizers_on_cuda_match_cpu(name, params, bits):
    W, _, _ = layer(seed=1)
    cpu = make_quantizer(name, bits, **params).quantize(W)
    gpu = make_quantizer(name, bits, **params).quantize(W.to(CUDA))
    assert gpu.q.device.type == "cuda"
    assert agree(cpu, gpu) >= 0.999
    same = (cpu.scales == gpu.scales.cpu()).all(dim=1)
    assert float(same.double().mean()) >= 0.98
    assert torch.equal(gpu.q.cpu()[same], cpu.q[same])  # a row with the same scale has the same codes


@pytest.mark.parametrize("dtype,min_agree", [("float64", 0.999), ("float32", 0.99)])
@pytest.mark.parametrize("group_size,actorder", [(None, True), (32, False)])
def test_gptq_on_cuda_matches_cpu(dtype, min_agree, group_size, actorder, monkeypatch):
    W, X, H = layer(seed=2)
    qz = make_quantizer("gptq", 4, group_size, dtype=dtype, actorder=actorder, blocksize=32)
    cpu = qz.quantize(W, H)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    gpu = qz.quantize(W.to(CUDA), H.to(CUDA))
    assert calls == []  # CPU thread tuning only on the CPU
    assert gpu.q.device.type == "cuda" and gpu.params == cpu.params
    assert torch.equal(gpu.scales.cpu(), cpu.scales)
    assert agree(cpu, gpu) >= min_agree
    e_cpu, e_gpu = layer_error(W, X, cpu), layer_error(W, X, gpu)
    assert abs(e_gpu - e_cpu) <= 1e-3 * e_cpu


def test_gptq_widths_grids_and_rdo_on_cuda():
    W, X, H = layer(seed=3)
    Wc, Hc = W.to(CUDA), H.to(CUDA)
    one_by_one = quantize_widths(Wc, Hc, [2, 4, 8], None, stacked=False, clip_search=True)
    stacked = quantize_widths(Wc, Hc, [2, 4, 8], None, clip_search=True)  # stacked by default on CUDA
    for bits, q in one_by_one.items():
        want = make_quantizer("gptq", bits, clip_search=True).quantize(Wc, Hc)
        assert torch.equal(q.q, want.q) and torch.equal(q.scales, want.scales)  # same device: bit-identical
        assert torch.equal(stacked[bits].scales, want.scales) and agree(stacked[bits], want) >= 0.999
    bits = torch.tensor([abs(v) for v in range(-7, 8)], dtype=torch.float64)
    g_cpu, g_gpu = GPTQ(W, H, torch.float64), GPTQ(Wc, Hc, torch.float64)
    r_cpu = g_cpu.quantize(4, rounding=RateDistortionRounding(bits, 0.01))
    r_gpu = g_gpu.quantize(4, rounding=RateDistortionRounding(bits, 0.01))
    assert r_gpu.q.device.type == "cuda" and agree(r_cpu, r_gpu) >= 0.999


def test_lqer_on_cuda_matches_cpu():
    W, _, _ = layer(seed=4)
    wq = make_quantizer("rtn", 3).quantize(W)
    a_cpu, b_cpu = fit_lqer(W, wq, 4)
    a_gpu, b_gpu = fit_lqer(W.to(CUDA), wq.to(CUDA), 4)
    assert a_gpu.q.device.type == "cuda"
    # Singular vectors are defined up to sign; the product of the (symmetric) quantized factors is not.
    torch.testing.assert_close((a_gpu.dequantize() @ b_gpu.dequantize()).cpu(), a_cpu.dequantize() @ b_cpu.dequantize(),
                               rtol=0, atol=1e-3)


def tiny_model(device):
    torch.manual_seed(0)
    return build_from_config(TINY_GPT).float().to(device).eval()


def test_hessians_on_cuda_match_cpu():
    tokens = np.random.default_rng(0).integers(0, TINY_GPT["vocab_size"], 4096)
    batches = calibration_batches(tokens, 2048, 128, 4)
    h_cpu = collect_hessians(tiny_model("cpu"), batches)
    h_gpu = collect_hessians(tiny_model(CUDA), batches)
    assert sorted(h_cpu) == sorted(h_gpu) and h_cpu
    for name, h in h_cpu.items():
        assert h_gpu[name].device.type == "cuda"
        torch.testing.assert_close(h_gpu[name].cpu(), h, rtol=1e-3, atol=1e-5 * float(h.abs().max()))


def test_compress_with_cuda_hessians_and_load_on_cuda(tmp_path):
    tokens = np.random.default_rng(1).integers(0, TINY_GPT["vocab_size"], 4096)
    batches = calibration_batches(tokens, 2048, 128, 4)
    results = {}
    for dev in ("cpu", "cuda"):
        model = tiny_model(dev)
        hessians = collect_hessians(model, batches)
        sd = model.state_dict()
        out = tmp_path / f"{dev}.qpk"
        r = compress(sd, out, budget=60_000, hessians=hessians, model_config=TINY_GPT)
        assert r.bytes_total <= 60_000 and out.is_file()
        results[dev] = (sd, out)
    sd_cpu = results["cpu"][0]
    loaded = {dev: qpack.load(path) for dev, (_, path) in results.items()}
    err = {dev: sum(float(torch.linalg.norm(t - sd_cpu[k].cpu().float())) for k, t in sd.items()) for dev, sd in
           loaded.items()}
    assert abs(err["cuda"] - err["cpu"]) <= 0.1 * err["cpu"], err
    on_gpu = qpack.load(results["cuda"][1], device="cuda")
    assert all(t.device.type == "cuda" for t in on_gpu.values())
    for k, t in on_gpu.items():
        assert torch.equal(t.cpu(), loaded["cuda"][k])


def test_sliding_eval_on_cuda_matches_cpu():
    tokens = np.random.default_rng(2).integers(0, TINY_GPT["vocab_size"], 1500)
    nll_cpu = sliding_nll(tiny_model("cpu"), tokens, 128, 64, batch=4, device="cpu")
    nll_gpu = sliding_nll(tiny_model(CUDA), tokens, 128, 64, batch=4, device="cuda")
    assert np.isfinite(nll_gpu).all() and nll_gpu.shape == nll_cpu.shape
    # bf16 autocast on CUDA (as the challenge scores): close per token, very close on the mean.
    assert abs(nll_gpu.mean() - nll_cpu.mean()) <= 5e-3 * nll_cpu.mean()
    assert np.abs(nll_gpu - nll_cpu).max() <= 0.2

"""make_quantizer("gptq") against an independent float64 GPTQ written here from the paper, column by column
with the full (non-lazy) update: exact codes at blocksize 128 on a 256-column layer, where a GPTQ that drops
the update from one block to the next gives different codes."""
from __future__ import annotations

import numpy as np
import torch

from qpack.quant.base import make_quantizer

ROWS, COLS, SAMPLES, BITS = 48, 256, 2048, 4


def _trained_like_layer(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(W, H): a weight with a decaying spectrum and heavy tails; inputs whose features are strongly correlated."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((ROWS, ROWS)))
    v, _ = np.linalg.qr(rng.standard_normal((COLS, COLS)))
    spectrum = 1.0 / (1.0 + np.arange(ROWS)) ** 0.7
    W = (u * spectrum) @ v[:ROWS] + 0.02 * rng.laplace(size=(ROWS, COLS))
    mix = np.eye(COLS) + 0.35 * rng.standard_normal((COLS, COLS)) / np.sqrt(COLS)
    X = rng.standard_normal((SAMPLES, COLS)) @ mix * rng.uniform(0.3, 3.0, COLS)  # uneven feature scales
    return W.astype(np.float32), (X.T @ X / SAMPLES)


def reference_gptq(W: np.ndarray, H: np.ndarray, scales: np.ndarray, bits: int, percdamp: float = 0.01,
                   blocksize: int | None = None) -> np.ndarray:
    """GPTQ in float64: act-order, Hinv = upper Cholesky of (H + damp I)^-1, every column's error pushed onto
    every later column at once. blocksize=B keeps the update inside blocks of B columns (the broken variant)."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    S = np.broadcast_to(scales.astype(np.float64), W.shape).copy()
    perm = np.argsort(-np.diag(H), kind="stable")
    W, H, S = W[:, perm], H[perm][:, perm], S[:, perm]
    damp = percdamp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H + damp * np.eye(H.shape[0]))).T
    m = (1 << (bits - 1)) - 1
    Q = np.zeros_like(W)
    for i in range(W.shape[1]):
        q = np.clip(np.round(W[:, i] / S[:, i]), -m, m)
        Q[:, i] = q
        err = (W[:, i] - q * S[:, i]) / U[i, i]
        end = W.shape[1] if blocksize is None else (i // blocksize + 1) * blocksize
        W[:, i + 1:end] -= np.outer(err, U[i, i + 1:end])
    return Q[:, np.argsort(perm)].astype(np.int8)


def test_gptq_codes_equal_the_float64_reference_at_blocksize_128():
    W, H = _trained_like_layer()
    got = make_quantizer("gptq", BITS, blocksize=128, dtype="float64").quantize(torch.from_numpy(W),
                                                                                 torch.from_numpy(H))
    got_q, got_scales = got.q.numpy(), got.scales.numpy()
    m = (1 << (BITS - 1)) - 1
    want_scales = (np.abs(W).max(axis=1, keepdims=True) / m).astype(np.float16)
    assert np.array_equal(got_scales, want_scales)
    want = reference_gptq(W, H, got_scales, BITS)
    assert np.array_equal(got_q, want), f"{int((got_q != want).sum())} of {want.size} codes differ"
    # the test has teeth: dropping the cross-block update changes many codes on this layer
    in_block_only = reference_gptq(W, H, got_scales, BITS, blocksize=128)
    assert int((in_block_only != want).sum()) > want.size // 50


def test_gptq_reduces_the_output_error_of_round_to_nearest():
    W, H = _trained_like_layer(1)
    gptq = make_quantizer("gptq", BITS, dtype="float64").quantize(torch.from_numpy(W), torch.from_numpy(H))
    rtn = make_quantizer("rtn", BITS).quantize(torch.from_numpy(W))

    def output_error(q) -> float:
        E = q.dequantize().double().numpy() - W
        return float(np.trace(E @ H @ E.T))

    assert output_error(gptq) < 0.8 * output_error(rtn)

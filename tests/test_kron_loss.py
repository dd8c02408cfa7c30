"""The Kronecker-factored Fisher loss proxy (loss proxy "kfac"): against the explicit Kronecker product, against
the diagonal Fisher on uncorrelated errors, and the one-line refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qpack.compress import CompressConfig, resolve_loss_proxy
from qpack.errors import QpackInputError
from qpack.sensitivity import fisher_weighted_loss, kron_weighted_loss


def _case(rows=4, cols=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, cols, generator=g) @ (torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g))
    H = X.T @ X / 200
    F = torch.rand(rows, cols, generator=g) + 0.1
    w = torch.randn(rows, cols, generator=g)
    wq = w + 0.05 * torch.randn(rows, cols, generator=g)
    return w, wq, F, H


def test_equals_the_explicit_kronecker_quadratic_form():
    w, wq, F, H = _case()
    a = F.double().sum(1).numpy() / float(torch.diagonal(H).double().sum())
    e = (w - wq).double().numpy().reshape(-1)  # row-major: row r's columns are contiguous
    K = np.kron(np.diag(a), H.double().numpy())
    assert kron_weighted_loss(w, wq, F, H) == pytest.approx(0.5 * e @ K @ e, rel=1e-12)


def test_matches_the_diagonal_fisher_on_average_for_uncorrelated_errors():
    w, _, F, H = _case(rows=8, cols=16, seed=1)
    g = torch.Generator().manual_seed(7)
    kron, diag = 0.0, 0.0
    for _ in range(400):
        wq = w + 0.01 * torch.randn(w.shape, generator=g)
        kron += kron_weighted_loss(w, wq, F, H)
        diag += fisher_weighted_loss(w, wq, F)
    assert kron == pytest.approx(diag, rel=0.05)


def test_prices_errors_the_hessian_cancels_below_the_diagonal_fisher():
    """An error along H's smallest eigenvector costs the layer's output almost nothing; the diagonal Fisher
    cannot see that, the Kronecker form does."""
    w, _, F, H = _case(rows=3, cols=6, seed=2)
    evals, evecs = torch.linalg.eigh(H)
    wq = w + 0.1 * evecs[:, 0].reshape(1, -1).expand(3, -1)
    assert kron_weighted_loss(w, wq, F, H) < 0.2 * fisher_weighted_loss(w, wq, F)


def test_refusals():
    w, wq, F, H = _case()
    with pytest.raises(QpackInputError, match="do not match"):
        kron_weighted_loss(w, wq, F, H[:3, :3])
    with pytest.raises(QpackInputError, match="kfac needs Fisher"):
        resolve_loss_proxy(CompressConfig(loss_proxy="kfac"), have_fisher=False)
    assert resolve_loss_proxy(CompressConfig(loss_proxy="kfac"), have_fisher=True).loss_proxy == "kfac"

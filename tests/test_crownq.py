"""CROWN-Q penalty and the second-order loss estimate."""
from __future__ import annotations

import pytest
import torch

from qpack.crownq import crownq_penalty, expected_loss_increase
from qpack.errors import QpackInputError
from qpack.quant import make_quantizer, qmax


def test_penalty_by_hand():
    W = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.25, -0.5]])
    h = torch.tensor([2.0, 1.0, 4.0])
    # int4: qmax 7. Row steps 3/7 and 0.5/7; every element of a row shares its row's step.
    d0, d1 = 3.0 / 7, 0.5 / 7
    want = (2 + 1 + 4) * (d0**2 + d1**2) / 12
    got = crownq_penalty({"w": W}, 4, {"w": h}, lam=1.0)
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert float(crownq_penalty({"w": W}, 4, {"w": h}, lam=0.3)) == pytest.approx(0.3 * want, rel=1e-6)
    # No Hessian: h = 1.
    assert float(crownq_penalty([("w", W)], 4)) == pytest.approx(3 * (d0**2 + d1**2) / 12, rel=1e-6)


def test_penalty_groups_and_several_tensors_by_hand():
    W = torch.tensor([[1.0, -2.0, 4.0, 0.5, 3.0]])
    h = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # group_size 2: groups [1,-2], [4,0.5], [3] with steps 2/3, 4/3, 3/3 at int3 (qmax 3).
    want = ((1 + 2) * (2 / 3) ** 2 + (3 + 4) * (4 / 3) ** 2 + 5 * 1.0**2) / 12
    got = crownq_penalty({"a": W}, 3, {"a": h}, group_size=2)
    assert float(got) == pytest.approx(want, rel=1e-6)
    V = torch.tensor([[2.0, 1.0]])
    both = crownq_penalty({"a": W, "b": V}, {"a": 3, "b": 8}, {"a": h}, group_size=2)
    assert float(both) == pytest.approx(want + 2 * (2 / 127) ** 2 / 12, rel=1e-6)


def test_penalty_gradient_is_finite_and_points_at_the_row_maxima():
    torch.manual_seed(0)
    W = torch.randn(5, 8, requires_grad=True)
    h = torch.rand(8) + 0.1
    p = crownq_penalty({"w": W}, 6, {"w": h}, lam=2.0)
    p.backward()
    g = W.grad
    assert torch.isfinite(g).all()
    # Only each row's absmax element moves the step: d/dw of lam*sum(h)*(|w|/qmax)^2/12.
    idx = W.detach().abs().argmax(dim=1)
    want = torch.zeros_like(W)
    for r, c in enumerate(idx.tolist()):
        w = float(W.detach()[r, c])
        want[r, c] = 2.0 * float(h.sum()) * 2 * w / qmax(6) ** 2 / 12
    torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-8)


def test_penalty_on_parameters_of_any_rank():
    lin = torch.nn.Conv1d(3, 4, 2)
    p = crownq_penalty(lin.named_parameters(), 5)
    p.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    assert float(crownq_penalty({}, 5)) == 0.0


def test_sensitivity_grows_as_bits_drop():
    torch.manual_seed(1)
    W = torch.randn(16, 32)
    h = torch.rand(32)
    for b in range(3, 9):
        W64, h64 = W.double(), h.double()
        ratio = float(crownq_penalty({"w": W64}, b - 1, {"w": h64})) / float(crownq_penalty({"w": W64}, b, {"w": h64}))
        # The step is absmax / qmax, so one bit less multiplies the penalty by (qmax(b) / qmax(b-1))^2:
        # a little over 4 (4.06 at int8 -> int7), exactly 9 at int3 -> int2.
        assert ratio == pytest.approx((qmax(b) / qmax(b - 1)) ** 2, rel=1e-9)
        assert ratio > 4.0
        if b >= 6:
            assert ratio < 4.3


def test_bad_inputs():
    W = torch.randn(2, 3)
    with pytest.raises(QpackInputError, match="no bit width"):
        crownq_penalty({"w": W}, {"v": 4})
    with pytest.raises(QpackInputError, match="entries"):
        crownq_penalty({"w": W}, 4, {"w": torch.ones(4)})
    with pytest.raises(QpackInputError, match="bits"):
        crownq_penalty({"w": W}, 9)
    with pytest.raises(QpackInputError):
        expected_loss_increase(W, W, torch.ones(4, 4))
    with pytest.raises(QpackInputError):
        expected_loss_increase(W, W, torch.ones(4))


def test_expected_loss_increase_by_hand():
    W = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    Wq = torch.tensor([[1.5, 2.0], [0.0, 0.0]])
    E = W - Wq  # [[-0.5, 0], [0, -1]]
    H = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    want = float(torch.trace(E @ H @ E.T)) / 2
    assert expected_loss_increase(W, Wq, H) == pytest.approx(want)
    assert expected_loss_increase(W, Wq, torch.tensor([2.0, 3.0])) == pytest.approx((2 * 0.25 + 3 * 1.0) / 2)
    assert expected_loss_increase(W, Wq) == pytest.approx(1.25 / 2)
    # A diagonal H and its diagonal agree.
    hd = torch.tensor([0.7, 1.9])
    assert expected_loss_increase(W, Wq, torch.diag(hd)) == pytest.approx(expected_loss_increase(W, Wq, hd))


def test_expected_loss_increase_is_exact_for_least_squares():
    """At the least-squares optimum W*, L(W* + E) - L(W*) = trace(E H E^T) / 2 with H = X^T X / n."""
    g = torch.Generator().manual_seed(2)
    n, cols, rows = 400, 12, 5
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g, dtype=torch.float64)
    Y = torch.randn(n, rows, generator=g, dtype=torch.float64)
    Wstar = torch.linalg.lstsq(X, Y).solution.T
    loss = lambda W: float(((Y - X @ W.T) ** 2).sum() / (2 * n))  # noqa: E731
    q = make_quantizer("rtn", 3).quantize(Wstar.float())
    Wq = q.dequantize().double()
    H = X.T @ X / n
    assert expected_loss_increase(Wstar, q, H) == pytest.approx(loss(Wq) - loss(Wstar), rel=1e-5)


def test_record_form_is_693s_formula():
    """lam * sum_i mean_j(w_ij^2) * (rowmax_i / 15)^2 / 12, computed here in numpy, with its gradient."""
    import numpy as np

    from qpack.crownq import crownq_record_penalty

    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(6, 10)), rng.normal(size=(3, 7)) * 2.0
    want = sum(float(((m ** 2).mean(axis=1) * (np.abs(m).max(axis=1) / 15.0) ** 2 / 12.0).sum()) for m in (a, b))
    wa = torch.tensor(a, requires_grad=True)
    got = crownq_record_penalty({"a": wa, "b": torch.tensor(b)}, lam=0.01)
    assert float(got) == pytest.approx(0.01 * want, rel=1e-6)
    got.backward()
    assert wa.grad is not None and wa.grad.abs().sum() > 0
    assert float(crownq_record_penalty({"a": torch.tensor(a)}, lam=1.0, levels=31)) == pytest.approx(
        float(((a ** 2).mean(axis=1) * (np.abs(a).max(axis=1) / 31.0) ** 2 / 12.0).sum()), rel=1e-6)
    assert float(crownq_record_penalty({})) == 0.0
    with pytest.raises(QpackInputError, match="levels"):
        crownq_record_penalty({"a": torch.tensor(a)}, levels=0)
    # qpack's own form is untouched by the new mode: h = 1, delta = rowmax / qmax(6) = rowmax / 31, sum over j
    qp = float(crownq_penalty({"a": torch.tensor(a)}, 6))
    assert qp == pytest.approx(float(((np.abs(a).max(axis=1) / 31.0) ** 2 / 12.0 * a.shape[1]).sum()), rel=1e-6)

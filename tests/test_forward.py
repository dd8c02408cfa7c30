"""qpack.forward: which call a model gets for calibration and eval, and one clear line when the user's code fails."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qpack.errors import QpackInputError
from qpack.forward import adapter_for, logits_module, needs_targets
from qpack.hessian import collect_hessians


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, idx):
        return self.head(self.emb(idx))


class WithTargets(Plain):
    def forward(self, input_ids, target_ids, reduction="mean"):
        logits = super().forward(input_ids)
        return nn.functional.cross_entropy(logits.reshape(-1, 16), target_ids.reshape(-1), reduction=reduction)


class WithLogits(WithTargets):
    def forward_logits(self, input_ids):
        return Plain.forward(self, input_ids)


class Broken(Plain):
    def forward(self, idx):
        raise RuntimeError("shapes do not line up\nsecond line of a long torch message")


def double_logits(model, input_ids):
    """A --forward function: (model, input_ids) -> logits."""
    return 2 * Plain.forward(model, input_ids)


def test_signature_decides_the_calibration_call():
    assert not needs_targets(Plain())
    assert needs_targets(WithTargets())  # the default `reduction` does not count
    rows = torch.arange(2 * 9).reshape(2, 9) % 16
    seen = []
    model = WithTargets()
    model.register_forward_pre_hook(lambda mod, args: seen.append(args))
    adapter = adapter_for(model)
    assert adapter.extra_tokens == 1
    adapter.run(model, rows)
    x, y = seen[0]
    assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:])
    assert adapter_for(Plain()).extra_tokens == 0


def test_logits_route():
    idx = torch.randint(0, 16, (3, 5))
    torch.manual_seed(0)
    m = WithLogits()
    wrapped = logits_module(m)
    torch.testing.assert_close(wrapped(idx), Plain.forward(m, idx))
    torch.testing.assert_close(logits_module(m, double_logits)(idx), 2 * Plain.forward(m, idx))
    torch.testing.assert_close(logits_module(m, f"{__name__}:double_logits")(idx), 2 * Plain.forward(m, idx))
    p = Plain()
    torch.testing.assert_close(logits_module(p)(idx), p(idx))
    with pytest.raises(QpackInputError, match="needs target ids.*--forward"):
        logits_module(WithTargets())


def test_user_errors_are_one_line_naming_the_model_and_call():
    rows = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(QpackInputError) as exc:
        adapter_for(Broken()).run(Broken(), rows)
    msg = str(exc.value)
    assert "Broken.forward(input_ids[2x4])" in msg and "RuntimeError: shapes do not line up" in msg
    assert "\n" not in msg
    with pytest.raises(QpackInputError, match=r"WithTargets.forward\(input_ids\[2x3\], target_ids\[2x3\]\)"):
        adapter_for(WithTargets()).run(WithTargets(), torch.full((2, 4), 99))  # ids past the vocabulary
    with pytest.raises(QpackInputError, match="returned shape"):
        logits_module(Plain(), lambda model, idx: idx.float())(rows)


def test_forward_spec_that_does_not_exist():
    for spec, words in (("no_such_mod_qp:f", "--forward no_such_mod_qp:f: cannot import"),
                        (f"{__name__}:missing", "has no attribute"), ("bad spec", "module.path:function")):
        with pytest.raises(QpackInputError, match=words):
            adapter_for(Plain(), spec)


def test_hessians_through_a_targets_model_match_the_plain_call():
    torch.manual_seed(0)
    plain = Plain()
    targets = WithTargets()
    targets.load_state_dict(plain.state_dict())
    rows = torch.randint(0, 16, (4, 11))
    want = collect_hessians(plain, [rows[:, :-1]])
    got = collect_hessians(targets, [rows], run=adapter_for(targets).run)
    emb = plain.emb(rows[:, :-1]).detach().reshape(-1, 8)
    torch.testing.assert_close(got["head.weight"], emb.T @ emb / emb.shape[0])
    torch.testing.assert_close(got["head.weight"], want["head.weight"])


def test_calibrate_takes_a_stream_or_batches():
    import numpy as np

    import qpack

    torch.manual_seed(0)
    model = Plain()
    rows = torch.randint(0, 16, (6, 7))
    want = collect_hessians(model, [rows[:3], rows[3:]])["head.weight"]
    torch.testing.assert_close(qpack.calibrate(model, rows)["head.weight"], want)  # one 2-D tensor: one batch
    torch.testing.assert_close(qpack.calibrate(model, [rows[:3], rows[3:]])["head.weight"], want)
    stream = np.arange(42) % 16
    got = qpack.calibrate(model, stream, seq_len=7)  # 42 tokens in rows of 7: exactly `rows` laid end to end
    torch.testing.assert_close(got["head.weight"],
                               collect_hessians(model, [torch.as_tensor(stream).reshape(6, 7)])["head.weight"])
    with pytest.raises(QpackInputError, match="no batches"):
        qpack.calibrate(model, [])
    with pytest.raises(QpackInputError, match="2-D tensor of token ids"):
        qpack.calibrate(model, [torch.zeros(3)])

"""The reference GPT: config validation and serialization, shapes and causality under every option, Muon, QAT."""
from __future__ import annotations

import json

import pytest
import torch

from qpack.errors import QpackInputError
from qpack.quant import make_quantizer
from qpack.models.gpt import GPT, GPTConfig, build_from_config, count_params
from trainers.gpt.muon import Muon, orthogonalize, split_params
from trainers.gpt.qat import rtn_dequantized, set_fake_quant

torch.set_num_threads(1)

TINY = dict(vocab_size=61, n_layer=4, n_embd=32, n_head=4, n_kv_head=2)

OPTIONS = {
    "baseline": {},
    "unet_skips": dict(unet_skips=True),
    "recurrence": dict(recur_layers=(1, 2)),
    "recurrence_unet": dict(recur_layers=(0, 1), unet_skips=True),
    "xsa": dict(xsa_last=2),
    "bigram": dict(bigram_buckets=29, bigram_dim=8),
    "smear": dict(smear_gate=True),
    "value_residual": dict(value_residual=True),
    "value_residual_recur0": dict(value_residual=True, recur_layers=(0,)),
    "partial_rope": dict(rope_frac=0.5),
    "no_rope": dict(rope_frac=0.0),
    "leaky": dict(activation="leaky_relu2"),
    "untied_nocap_noqk": dict(tie_embeddings=False, logit_softcap=0.0, qk_norm=False),
    "mha": dict(n_kv_head=4),
    "mqa_mlp3": dict(n_kv_head=1, mlp_mult=3.0),
    "seed790_parts": dict(resid_mix="mix4", ln_scale=True, ve_layers=(2, 3), ve_dim=8, bigram_buckets=13,
                          bigram_dim=4, hash_scale=0.05, smear_gate=True, xsa_last=4, unet_skips=True),
    "seed745_parts": dict(recur_layers=(1, 2), recur_own_controls=True, attn_gate=True, value_residual=True,
                          value_residual_weights=2, resid_mix="channel", ve_layers=(4, 5), ve_dim=8),
    "seed951_parts": dict(kv_share_last=4, trigram_buckets=11, trigram_dim=4, bigram_buckets=13, bigram_dim=4,
                          hash_scale=0.05, activation="leaky_relu2"),
    "everything": dict(unet_skips=True, recur_layers=(2, 3), xsa_last=4, bigram_buckets=13, bigram_dim=4,
                       smear_gate=True, value_residual=True, rope_frac=0.25, activation="leaky_relu2"),
}


def _randomized(model: GPT) -> GPT:
    """Zero-initialized projections would hide most of the network; give every parameter random values."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_forward_shape_and_causality(name):
    cfg = GPTConfig(**{**TINY, **OPTIONS[name]})
    model = _randomized(GPT(cfg)).eval()
    torch.manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        logits = model(idx)
        assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
        if cfg.logit_softcap:
            assert logits.abs().max() <= cfg.logit_softcap
        for t in (0, 5, 11):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 7) % cfg.vocab_size
            other = model(changed)
            torch.testing.assert_close(other[:, :t], logits[:, :t], rtol=0, atol=1e-5)
            assert (other[:, t] - logits[:, t]).abs().max() > 1e-4  # the changed position does see its token


def test_parameter_counts_match_the_shapes():
    cfg = GPTConfig(**TINY)
    d, h, kv, hd = 32, 4, 2, 8
    per_block = d * h * hd + 2 * d * kv * hd + h * hd * d + 2 * d * 2 * d + 2 * d + h
    assert count_params(cfg) == 61 * d + 4 * per_block
    unet = GPTConfig(**TINY, unet_skips=True, recur_layers=(1, 2))  # 6 executed layers -> 3 skip gains
    assert count_params(unet) == count_params(cfg) + 3 * d
    # the parameter-golf baseline shape: 17.06M there, which adds 9 * 2 * 512 residual-mix gains we do not have
    golf = GPTConfig(vocab_size=1024, n_layer=9, n_embd=512, n_head=8, n_kv_head=4, unet_skips=True)
    assert count_params(golf) + 9 * 2 * 512 == pytest.approx(17.06e6, rel=1e-3)


def test_recurrence_schedule():
    assert GPTConfig(**TINY, recur_layers=(1, 2)).schedule == [0, 1, 2, 1, 2, 3]
    assert GPTConfig(**TINY).schedule == [0, 1, 2, 3]


def test_config_round_trip_through_json_and_the_builtin_arch():
    cfg = GPTConfig(**TINY, **OPTIONS["everything"])
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["arch"] == "gpt" and d["version"] == 1
    assert GPTConfig.from_dict(d) == cfg
    from qpack.models import get_model_factory

    assert get_model_factory("gpt") is build_from_config
    model = build_from_config(d)
    assert isinstance(model, GPT) and model.cfg == cfg


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_head=3), "n_head"),
    (dict(n_kv_head=3), "n_kv_head"),
    (dict(n_layer=0), "n_layer"),
    (dict(activation="gelu"), "activation"),
    (dict(rope_frac=1.5), "rope_frac"),
    (dict(rope_frac=0.1), "rope_frac"),
    (dict(recur_layers=(1, 3)), "recur_layers"),
    (dict(recur_layers=(4,)), "recur_layers"),
    (dict(xsa_last=5), "xsa_last"),
    (dict(bigram_buckets=1), "bigram_buckets"),
    (dict(n_embd=32.0), "n_embd"),
    (dict(unet_skips=1), "unet_skips"),
    (dict(logit_softcap=-1.0), "logit_softcap"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(QpackInputError, match=rf"GPTConfig\.{field}\b"):
        GPTConfig(**{**TINY, **kwargs})


def test_from_dict_rejects_foreign_configs():
    good = GPTConfig(**TINY).to_dict()
    with pytest.raises(QpackInputError, match="arch"):
        GPTConfig.from_dict({**good, "arch": "llama"})
    with pytest.raises(QpackInputError, match="version"):
        GPTConfig.from_dict({**good, "version": 2})
    with pytest.raises(QpackInputError, match="n_layers"):
        GPTConfig.from_dict({**good, "n_layers": 3})


def test_orthogonalize_flattens_singular_values():
    torch.manual_seed(0)
    for shape in ((16, 48), (48, 16), (32, 32)):
        k = min(shape)  # a gradient-like matrix with known singular values spread over 0.1..3
        u, _ = torch.linalg.qr(torch.randn(shape[0], k))
        v, _ = torch.linalg.qr(torch.randn(shape[1], k))
        g = u @ torch.diag(torch.logspace(-1, 0.5, k)) @ v.T
        o = orthogonalize(g)
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.5 and s.max() < 1.3, (shape, s.min(), s.max())
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        cos = (o * (u @ vh)).sum() / (o.norm() * (u @ vh).norm())
        assert cos > 0.9


def test_muon_and_adam_split_covers_every_parameter_once():
    model = GPT(GPTConfig(**TINY, **OPTIONS["everything"], tie_embeddings=False))
    parts = split_params(model)
    ids = [id(p) for group in parts.values() for p in group]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert all(p.ndim == 2 for p in parts["matrix"]) and parts["head"] == [model.lm_head.weight]
    assert {id(model.tok_emb.weight), id(model.bigram_emb.weight)} == {id(p) for p in parts["embed"]}
    Muon(parts["matrix"])  # accepts them all
    with pytest.raises(ValueError):
        Muon(parts["scalar"])


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("group_size", [None, 16, 7])
def test_qat_rounds_exactly_like_qpack_rtn(bits, group_size):
    torch.manual_seed(bits)
    w = torch.randn(24, 37) * torch.rand(24, 1)
    w[3] = 0.0  # an all-zero row exercises the smallest-scale clamp
    want = make_quantizer("rtn", bits, group_size).quantize(w).dequantize()
    assert torch.equal(rtn_dequantized(w, bits, group_size), want)


def test_fake_quant_forward_uses_quantized_weights_and_passes_gradients():
    torch.manual_seed(0)
    model = _randomized(GPT(GPTConfig(**TINY)))
    idx = torch.randint(0, 61, (2, 9))
    reference = GPT(GPTConfig(**TINY))
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            if name.startswith("blocks.") and p.ndim == 2:
                q.copy_(make_quantizer("rtn", 4).quantize(p).dequantize())
    assert set_fake_quant(model, lambda w: rtn_dequantized(w, 4)) == 4 * 6  # q, k, v, proj, fc, mlp proj
    out = model(idx)
    torch.testing.assert_close(out, reference(idx), rtol=0, atol=1e-5)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks.parameters() if p.ndim == 2)
    set_fake_quant(model, None)
    assert not torch.allclose(model(idx), reference(idx))


def test_attention_inputs_stay_bf16_under_autocast(monkeypatch):
    """On CUDA flash-attn is taken only for half-precision q, k, v: every option must keep them bf16."""
    import qpack.models.gpt as model_module

    seen = []
    real = model_module.attend

    def spy(q, k, v):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v)

    monkeypatch.setattr(model_module, "attend", spy)
    model = _randomized(GPT(GPTConfig(**TINY, **OPTIONS["everything"])))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 61, (2, 8)))
    assert logits.dtype == torch.float32
    assert len(seen) == len(model.cfg.schedule)
    assert set(seen) == {(torch.bfloat16,) * 3}

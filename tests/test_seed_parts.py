"""The seed records' model parts, each a GPTConfig switch: what each one computes, checked against an
independent computation or against the model with the switch neutralised, and its parameter count."""
from __future__ import annotations

import pytest
import torch

from qpack.models.gpt import GPT, Block, Borrowed, GPTConfig, count_params
from trainers.gpt.qat import rtn_dequantized, set_fake_quant

torch.set_num_threads(1)
TINY = dict(vocab_size=61, n_layer=4, n_embd=32, n_head=4, n_kv_head=2)
D, KV = 32, 2 * 8  # width, K/V width (2 heads of 8)


def randomized(model: GPT, seed: int = 0) -> GPT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def copy_shared(dst: GPT, src: GPT) -> GPT:
    """Load src's weights into dst wherever the names match (dst's extra parameters keep their values)."""
    theirs = src.state_dict()
    dst.load_state_dict({k: theirs.get(k, v) for k, v in dst.state_dict().items()})
    return dst.eval()


IDX = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(3))


def test_resid_mix_channel_and_mix4_compute_their_formulas():
    g = torch.Generator().manual_seed(1)
    x, x0, o1, o2 = (torch.randn(2, 5, D, generator=g) for _ in range(4))
    chan = Block(GPTConfig(**TINY, resid_mix="channel"), xsa=False, mixes_values=False)
    a, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    with torch.no_grad():
        chan.resid_mix.copy_(torch.stack((a, b)))
    torch.testing.assert_close(chan.mix_input(x, x0, []), a * x + b * x0)
    mix4 = Block(GPTConfig(**TINY, resid_mix="mix4"), xsa=False, mixes_values=False)
    with torch.no_grad():
        mix4.resid_mix.copy_(torch.tensor([0.5, 2.0, -1.0, 3.0]))
    # outs holds the block outputs so far, latest last: o2 is the previous block's output, o1 the one before
    torch.testing.assert_close(mix4.mix_input(x, x0, [o1, o2]), 0.5 * x + 2.0 * o2 - 1.0 * o1 + 3.0 * x0)
    torch.testing.assert_close(mix4.mix_input(x, x0, [o2]), 0.5 * x + 2.0 * o2 + 3.0 * x0)
    assert tuple(chan.resid_mix.shape) == (2, D) and tuple(mix4.resid_mix.shape) == (4,)


@pytest.mark.parametrize("mode", ["channel", "mix4"])
def test_resid_mix_at_its_initial_values_is_the_plain_model(mode):
    plain = randomized(GPT(GPTConfig(**TINY)))
    mixed = GPT(GPTConfig(**TINY, resid_mix=mode)).eval()  # resid_mix at init: all weight on the stream
    copy_shared(mixed, plain)
    torch.testing.assert_close(mixed(IDX), plain(IDX), rtol=0, atol=1e-6)
    per_block = 2 * D if mode == "channel" else 4
    assert count_params(mixed.cfg) == count_params(plain.cfg) + 4 * per_block


def test_ln_scale_multiplies_each_position_by_one_over_sqrt():
    one = randomized(GPT(GPTConfig(**{**TINY, "n_layer": 1})))
    scaled = copy_shared(GPT(GPTConfig(**{**TINY, "n_layer": 1}, ln_scale=True)), one)
    torch.testing.assert_close(scaled(IDX), one(IDX), rtol=0, atol=0)  # position 0: 1/sqrt(1) = 1
    deep = randomized(GPT(GPTConfig(**TINY)))
    deep_scaled = copy_shared(GPT(GPTConfig(**TINY, ln_scale=True)), deep)
    assert (deep_scaled(IDX) - deep(IDX)).abs().max() > 1e-3
    # the second block's attention sees rms_norm(x) / sqrt(2): check it on the block directly
    blk = deep.blocks[1]
    x = torch.randn(2, 6, D)
    seen = []
    hook = blk.attn.q.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    blk(x, None, ln=1 / 2 ** 0.5)
    hook.remove()
    torch.testing.assert_close(seen[0], torch.nn.functional.rms_norm(x, (D,), eps=1e-6) / 2 ** 0.5)


def test_value_embedding_adds_a_projected_token_table_to_the_values():
    cfg = GPTConfig(**TINY, ve_layers=(1, 3), ve_dim=8)
    assert count_params(cfg) == count_params(GPTConfig(**TINY)) + 61 * 8 + 8 * KV + 1 + 2
    model = randomized(GPT(cfg))
    plain = copy_shared(GPT(GPTConfig(**TINY)), model)
    with torch.no_grad():
        model.ve_gains.zero_()
    torch.testing.assert_close(model(IDX), plain(IDX), rtol=0, atol=1e-6)  # gains 0: no value embedding
    with torch.no_grad():
        model.ve_gains.copy_(torch.tensor([0.0, 0.7]))
        table = model.ve_proj(model.ve_emb(IDX)) * model.ve_scale * 0.7
    # the same as adding the scaled table to position 3's value projection of the plain model
    hook = plain.blocks[3].attn.v.register_forward_hook(lambda m, i, o: o + table)
    torch.testing.assert_close(model(IDX), plain(IDX), rtol=0, atol=1e-6)
    hook.remove()
    assert (model(IDX) - plain(IDX)).abs().max() > 1e-4


def test_trigram_hash_buckets_and_count():
    cfg = GPTConfig(**TINY, trigram_buckets=37, trigram_dim=6, hash_scale=0.05)
    model = GPT(cfg)
    assert count_params(cfg) == count_params(GPTConfig(**TINY)) + 37 * 6 + 6 * D + 1
    ids = model.trigram_ids(IDX)
    assert ids.shape == IDX.shape and (ids[:, :2] == 36).all() and (ids[:, 2:] < 36).all()
    other = IDX.clone()
    other[:, 4] = (other[:, 4] + 1) % 61
    changed = (model.trigram_ids(other) != ids).any(dim=0)
    assert changed[4:7].all() and not changed[:4].any() and not changed[7:].any()  # t-2, t-1 and t only
    assert model.trigram_scale.item() == pytest.approx(0.05)


def test_kv_sharing_reuses_one_layers_projections():
    cfg = GPTConfig(**TINY, kv_share_last=2)
    model = GPT(cfg)
    assert model.blocks[2].attn.k.module is model.blocks[0].attn.k
    assert model.blocks[3].attn.v.module is model.blocks[1].attn.v
    names = set(model.state_dict())
    assert "blocks.3.attn.k.weight" not in names and "blocks.1.attn.k.weight" in names
    assert count_params(cfg) == count_params(GPTConfig(**TINY)) - 2 * 2 * D * KV
    everyone = GPT(GPTConfig(**TINY, kv_share_last=4))  # "XSA-all": every layer uses layer 0's K/V
    assert all(everyone.blocks[i].attn.k.module is everyone.blocks[0].attn.k for i in (1, 2, 3))
    randomized(model).train()
    model(IDX).square().mean().backward()
    assert model.blocks[0].attn.k.weight.grad.abs().sum() > 0
    # sharing layer 2 is the same as giving layer 2 a copy of layer 0's matrices
    own = GPT(GPTConfig(**TINY)).eval()
    sd = model.state_dict()
    for i, src in ((2, 0), (3, 1)):
        for w in ("k", "v"):
            sd[f"blocks.{i}.attn.{w}.weight"] = sd[f"blocks.{src}.attn.{w}.weight"]
    own.load_state_dict(sd)
    torch.testing.assert_close(own(IDX), model.eval()(IDX), rtol=0, atol=1e-6)


def test_attention_gate_is_a_per_head_sigmoid():
    cfg = GPTConfig(**TINY, attn_gate=True)
    assert count_params(cfg) == count_params(GPTConfig(**TINY)) + 4 * (D * 4 + 4)
    gated = randomized(GPT(cfg))
    plain = copy_shared(GPT(GPTConfig(**TINY)), gated)
    with torch.no_grad():
        for b in gated.blocks:
            b.attn.gate.weight.zero_()
            b.attn.gate.bias.fill_(60.0)  # sigmoid = 1: open
    torch.testing.assert_close(gated(IDX), plain(IDX), rtol=0, atol=1e-5)
    with torch.no_grad():
        for b in gated.blocks:
            b.attn.gate.bias.fill_(-60.0)  # closed: blocks add only their MLP
        for b in plain.blocks:
            b.attn.proj.weight.zero_()
    torch.testing.assert_close(gated(IDX), plain(IDX), rtol=0, atol=1e-5)


def test_two_weight_value_residual():
    cfg = GPTConfig(**TINY, value_residual=True, value_residual_weights=2)
    assert count_params(cfg) == count_params(GPTConfig(**TINY)) + 4 * 2  # every layer carries its pair
    vr = randomized(GPT(cfg))
    plain = copy_shared(GPT(GPTConfig(**TINY)), vr)
    with torch.no_grad():
        for b in vr.blocks:
            b.attn.v_mix.copy_(torch.tensor([0.0, 1.0]))  # all own values: no residual
    torch.testing.assert_close(vr(IDX), plain(IDX), rtol=0, atol=1e-6)
    with torch.no_grad():
        vr.blocks[1].attn.v_mix.copy_(torch.tensor([0.25, 0.75]))
    # the same as layer 1 of the plain model using 0.25 * layer 0's values + 0.75 * its own
    first = []
    h0 = plain.blocks[0].attn.v.register_forward_hook(lambda m, i, o: first.append(o))
    h1 = plain.blocks[1].attn.v.register_forward_hook(lambda m, i, o: 0.25 * first[-1] + 0.75 * o)
    torch.testing.assert_close(vr(IDX), plain(IDX), rtol=0, atol=1e-6)
    h0.remove(), h1.remove()
    assert (vr(IDX) - plain(IDX)).abs().max() > 1e-4


def test_repeated_layers_with_their_own_gains():
    base = GPTConfig(**TINY, recur_layers=(1, 2))
    own = GPTConfig(**TINY, recur_layers=(1, 2), recur_own_controls=True, attn_gate=True)
    gates = 4 * D + 4
    per_control = 2 * D + 4 + gates  # attn/mlp scales, q_gain, gate
    assert count_params(own) == count_params(GPTConfig(**TINY, recur_layers=(1, 2), attn_gate=True)) \
        + 2 * per_control
    model = randomized(GPT(own))
    twin = model.recur_blocks[0]
    assert twin.attn.q.module is model.blocks[1].attn.q and twin.mlp.fc.module is model.blocks[1].mlp.fc
    assert isinstance(twin.attn.k, Borrowed)
    shared = copy_shared(GPT(GPTConfig(**TINY, recur_layers=(1, 2), attn_gate=True)), model)
    for t, i in zip(model.recur_blocks, (1, 2)):  # twins with the physical blocks' gains: the shared model
        t.load_state_dict(model.blocks[i].state_dict(), strict=False)
    torch.testing.assert_close(model(IDX), shared(IDX), rtol=0, atol=1e-6)
    with torch.no_grad():
        twin.attn_scale.mul_(3.0)
    assert (model(IDX) - shared(IDX)).abs().max() > 1e-4
    assert count_params(base) < count_params(own)


def test_smear_gate_ignores_the_previous_token_at_a_document_start():
    model = randomized(GPT(GPTConfig(**TINY, smear_gate=True, bos_id=1)))
    idx = torch.tensor([[5, 6, 7, 1, 8, 9]])
    other = idx.clone()
    other[0, 2] = 30  # the token before the BOS
    a, b = model.embed(idx), model.embed(other)
    torch.testing.assert_close(a[0, 3], b[0, 3], rtol=0, atol=0)  # the BOS position does not blend
    assert (a[0, 2] - b[0, 2]).abs().max() > 0 and (a[0, 1] - model.embed(idx.roll(1, 1))[0, 1]).abs().max() > 0
    x = torch.nn.functional.rms_norm(model.tok_emb(idx), (D,), eps=1e-6)
    g = torch.sigmoid(model.smear)
    torch.testing.assert_close(a[0, 4], x[0, 4] + g * (x[0, 3] - x[0, 4]))  # after it, the usual blend
    torch.testing.assert_close(a[0, 3], x[0, 3])


def test_fake_quant_applies_in_training_mode_only_and_mlp_width_separately():
    model = randomized(GPT(GPTConfig(**TINY)))
    ref = copy_shared(GPT(GPTConfig(**TINY)), model)
    set_fake_quant(model, lambda w: rtn_dequantized(w, 6))
    assert set_fake_quant(model, lambda w: rtn_dequantized(w, 4), only_mlp=True) == 4 * 2
    assert model.blocks[0].mlp.fc.fake_quant is not model.blocks[0].attn.q.fake_quant
    model.eval()
    torch.testing.assert_close(model(IDX), ref(IDX), rtol=0, atol=0)  # eval: the float weights
    model.train()
    with torch.no_grad():
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            if n.startswith("blocks.") and p.ndim == 2:
                q.copy_(rtn_dequantized(p, 4 if ".mlp." in n else 6))
    torch.testing.assert_close(model(IDX), ref(IDX), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs, field", [
    (dict(resid_mix="dense"), "resid_mix"), (dict(ve_layers=(4,)), "ve_layers"), (dict(ve_layers=(1, 1)), "ve_layers"),
    (dict(kv_share_last=5), "kv_share_last"), (dict(value_residual_weights=3), "value_residual_weights"),
    (dict(recur_own_controls=True), "recur_own_controls"), (dict(trigram_buckets=1), "trigram_buckets"),
    (dict(hash_scale=-1.0), "hash_scale"),
])
def test_new_switches_reject_bad_values(kwargs, field):
    from qpack.errors import QpackInputError

    with pytest.raises(QpackInputError, match=rf"GPTConfig\.{field}\b"):
        GPTConfig(**{**TINY, **kwargs})


def test_borrowed_matrices_stay_shared_in_a_deep_copy():
    """TTT adapts a deep copy: borrowed K/V and repeat matrices must point into the copy, not the original."""
    import copy

    model = GPT(GPTConfig(**TINY, kv_share_last=2, recur_layers=(1, 2), recur_own_controls=True))
    dup = copy.deepcopy(model)
    assert dup.blocks[2].attn.k.module is dup.blocks[0].attn.k and dup.blocks[2].attn.k.module is not model.blocks[0].attn.k
    assert dup.recur_blocks[0].attn.q.module is dup.blocks[1].attn.q
    assert dup._at[3] is dup.recur_blocks[0] and dup._at[1] is dup.blocks[1]
    assert count_params(model.cfg) == sum(p.numel() for p in dup.parameters())

"""Score-first TTT: lr 0 is sliding eval, the caller's model is untouched, it learns, parameter choices."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qpack.eval.sliding import sliding_nll
from qpack.eval.ttt import EventLog, LoRALinear, TTTConfig, parse_params, plan_chunks, select_params, ttt_nll
from qpack.eval.sliding import plan_windows


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return x + self.proj(F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0])


class BlocksLM(nn.Module):
    def __init__(self, vocab=16, dim=16, n_blocks=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(n_blocks))
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _stream(n=300, vocab=16, seed=0):
    rng = np.random.default_rng(seed)
    phrase = rng.integers(2, vocab, 12)
    return np.tile(phrase, n // 12 + 1)[:n]


def test_zero_lr_reproduces_sliding_exactly():
    model = BlocksLM()
    tokens = np.random.default_rng(0).integers(0, 16, 120)
    want = sliding_nll(model, tokens, 16, 8, batch=4)
    got = ttt_nll(model, tokens, 16, 8, TTTConfig(chunk=20, lr=0.0), batch=4)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("params,opt", [("all", "sgd"), ("last:1", "adamw"), ("lora:4", "adamw")])
def test_ttt_learns_and_leaves_the_callers_model_alone(params, opt):
    model = BlocksLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = _stream()
    base = sliding_nll(model, tokens, 24, 12)
    lr = 0.05 if opt == "sgd" else 0.01
    got = ttt_nll(model, tokens, 24, 12, TTTConfig(chunk=24, lr=lr, epochs=2, optimizer=opt, params=params))
    assert got.mean() < base.mean() - 0.2
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_parameter_selection():
    m = BlocksLM(n_blocks=3)
    chosen = select_params(m, TTTConfig(params="last:2"))
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in m.named_parameters() if n.startswith(("blocks.1.", "blocks.2."))}
    assert len(chosen) == len(names)
    m = BlocksLM(n_blocks=2)
    chosen = select_params(m, TTTConfig(params="lora:3"))
    n_linear = 2 * 2 + 1
    assert len(chosen) == 2 * n_linear
    assert all(p.requires_grad for p in chosen)
    assert not any(p.requires_grad for n, p in m.named_parameters() if "lora_" not in n)
    x = torch.randint(0, 16, (2, 9))
    base = BlocksLM(n_blocks=2)
    assert torch.allclose(m(x), base(x), atol=1e-6)  # B starts at zero: LoRA starts as the base model
    for bad in ("last:0", "lora", "some", "lora:x", "all:3"):
        with pytest.raises(ValueError):
            parse_params(bad)
    with pytest.raises(ValueError, match="block pattern"):
        select_params(nn.Sequential(nn.Linear(2, 2)), TTTConfig(params="last:1"))


def test_chunks_follow_the_sliding_schedule():
    windows = plan_windows(100, 16, 8)
    chunks = plan_chunks(windows, 20)
    assert [w for c in chunks for w in c] == windows
    assert all(sum(w.b - w.a for w in c) >= 20 for c in chunks[:-1])


def test_reset_at_document_start_forgets_the_previous_document():
    model = BlocksLM()
    tokens = _stream(200)
    # sliding windows (W=16, S=8) end at 16, 24, 32, ...; chunks of 16 targets end at 16, 32, 48...
    # a BOS as target 47 (token 48) is the last target of the chunk ending at 48
    tokens[48] = 1
    cfg = dict(chunk=16, lr=0.05, epochs=2, params="all")
    plain = sliding_nll(model, tokens, 16, 8)
    log = EventLog()
    reset = ttt_nll(model, tokens, 16, 8, TTTConfig(reset_on_bos=True, **cfg), log=log)
    keep = ttt_nll(model, tokens, 16, 8, TTTConfig(reset_on_bos=False, **cfg))
    # the chunk after the reset is scored by the original weights again
    np.testing.assert_array_equal(reset[48:64], plain[48:64])
    assert not np.allclose(keep[48:64], plain[48:64])
    assert np.array_equal(reset[:48], keep[:48])
    assert ("train", 31, 48) not in log.events  # that chunk's training was dropped with the reset


# ---------------------------------------------------------------------------------------------- the seeds' recipes
def _violations(events, n_targets):
    """Updates that read a target not yet scored, and targets not scored exactly once."""
    scored = np.zeros(n_targets, dtype=int)
    bad = []
    for kind, lo, hi in events:
        if kind == "score":
            scored[lo:hi] += 1
        elif not np.all(scored[lo:hi]):
            bad.append((lo, hi))
    return bad + ([("scored", int(np.sum(scored != 1)))] if np.any(scored != 1) else [])


def _small(name):
    """A seed recipe at this test's size: chunks of 48 targets, 2 sequences per step, a larger lr."""
    import dataclasses

    from qpack.eval.ttt import RECIPES

    r = RECIPES[name]
    return dataclasses.replace(r, chunk=48, train_batch=2, lr=0.05 if r.optimizer == "sgd" else 0.01)


@pytest.mark.parametrize("name", ["pr691", "pr790", "pr745"])
def test_seed_recipes_are_score_first_and_skip_the_last_chunk(name):
    model = BlocksLM(n_blocks=3)
    tokens = _stream(6 * 48 + 1)  # six full chunks of 48 targets: the last one holds whole sequences too
    log = EventLog()
    cfg = _small(name)
    got = ttt_nll(model, tokens, 16, 8, cfg, log=log)
    assert np.isfinite(got).all()
    trains = [(lo, hi) for k, lo, hi in log.events if k == "train"]
    assert trains and _violations(log.events, tokens.size - 1) == []
    chunks = plan_chunks(plan_windows(tokens.size - 1, 16, 8), cfg.chunk)
    last_start = chunks[-1][0].a
    assert chunks[-1][-1].b - last_start == 48
    assert max(hi for _, hi in trains) <= last_start  # nothing learns from the last chunk
    # whole 16-token sequences, 2 per step: every update reads 1 + 2 * 16 targets (or one sequence at the end)
    assert {hi - lo for lo, hi in trains} <= {2 * 16 + 1, 2 * 16, 16 + 1, 16}
    n_epochs = {"pr691": 3, "pr790": 4, "pr745": 1}[name]
    assert cfg.epochs == n_epochs


def test_train_before_score_is_caught_by_the_check():
    log = EventLog()
    log.trained(0, 10)
    log.scored(0, 10)
    assert _violations(log.events, 10) != []


def test_cosine_over_chunks_reaches_the_optimizer(monkeypatch):
    import qpack.eval.ttt as ttt

    cfg = TTTConfig(chunk=40, lr=0.1, epochs=1, optimizer="sgd", schedule="cosine", train_last_chunk=True)
    seen = []
    real = ttt.train_chunk
    monkeypatch.setattr(ttt, "train_chunk", lambda m, opt, *a, **k: (seen.append(opt.param_groups[0]["lr"]),
                                                                        real(m, opt, *a, **k)))
    tokens = _stream(200)
    ttt.ttt_nll(BlocksLM(), tokens, 16, 8, cfg)
    n = len(plan_chunks(plan_windows(tokens.size - 1, 16, 8), 40))
    want = [0.1 * 0.5 * (1 + np.cos(np.pi * c / (n - 1))) for c in range(n)]
    np.testing.assert_allclose(seen, want, rtol=1e-12)
    assert seen[0] == pytest.approx(0.1) and seen[-1] == pytest.approx(0.0, abs=1e-12)


def test_last_k_plus_control_and_grouped_adamw_on_the_gpt():
    from qpack.eval.ttt import RECIPES, param_groups
    from qpack.models.gpt import GPT
    from trainers.gpt.presets import preset_config

    model = GPT(preset_config("pr790", "tiny").model)
    cfg = RECIPES["pr790"]
    chosen = select_params(model, cfg)
    on = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.10.attn.q.weight" in on and "blocks.9.mlp.fc.weight" in on
    assert "blocks.0.attn.q.weight" not in on and "tok_emb.weight" not in on
    assert {"blocks.0.attn_scale", "blocks.0.resid_mix", "blocks.3.attn.q_gain", "skip_weights",
            "smear", "ve_gains"} <= on
    groups = {g["role"]: g for g in param_groups(model, chosen, cfg)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups["matrix"]["params"]} == {n for n in on if n.startswith(("blocks.9.",
            "blocks.10.")) and n.endswith(".weight") and "scale" not in n and "resid_mix" not in n}
    assert "blocks.0.attn_scale" in {names[id(p)] for p in groups["control"]["params"]}
    assert sum(len(g["params"]) for g in groups.values()) == len(chosen)
    opt = torch.optim.AdamW(param_groups(model, chosen, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["eps"] == 1e-6
    assert parse_params("last:2+control") == ("last+control", 2)

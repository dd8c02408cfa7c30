"""The seed-record presets: `qpack train --preset prNNN --dry-run --json` reports the seed model's own parameter
count, derived here shape by shape from each record's train_gpt.py defaults (not from the model code), and the
recipes are valid qpack settings."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qpack.cli import main
from qpack.compress import CompressConfig
from qpack.eval.ttt import RECIPES as TTT_RECIPES
from trainers.gpt.presets import RECIPES, SEEDS, preset_config, preset_recipe

V, D, H, HD = 1024, 512, 8, 64  # every seed: vocab 1024, width 512, 8 heads of 64


def block_matrices(kv_heads: int, mlp_hidden: int) -> int:
    """c_q, c_k, c_v, proj (attention) and fc, proj (MLP) of one block, all bias-free."""
    kv = kv_heads * HD
    return D * D + 2 * D * kv + D * D + 2 * D * mlp_hidden


def hash_embedding(buckets: int, dim: int) -> int:
    """BigramHashEmbedding: table, projection to the width, and one learned scalar scale."""
    return buckets * dim + dim * D + 1


def value_embedding(kv_heads: int, ve_dim: int = 128, layers: int = 2) -> int:
    """ValueEmbedding shared table + projection to the K/V width + scalar scale, and one scale per layer."""
    return V * ve_dim + ve_dim * kv_heads * HD + 1 + layers


def seed_params(name: str) -> int:
    tok = V * D  # tied: the head reuses it
    smear = D
    if name == "pr790":  # 11 x (MHA 8/8, MLP 3.5x = 1792); controls: attn/mlp scale, q_gain, resid_mix (4 scalars)
        blocks = 11 * (block_matrices(8, 1792) + 2 * D + H + 4)
        return tok + blocks + hash_embedding(8192, 128) + smear + 5 * D + value_embedding(8)
    if name == "pr691":  # 11 x (GQA 8/4, MLP 3x = 1536); resid_mix is (2, 512)
        blocks = 11 * (block_matrices(4, 1536) + 2 * D + H + 2 * D)
        return tok + blocks + hash_embedding(2048, 128) + smear + 5 * D + value_embedding(4)
    if name == "pr951":  # 11 x (GQA 8/4, MLP 3x); no VE; trigram table removed in the script
        blocks = 11 * (block_matrices(4, 1536) + 2 * D + H + 2 * D)
        return tok + blocks + hash_embedding(20_480, 128) + smear + 5 * D
    if name == "pr745":  # 11 physical banks of matrices, 13 virtual blocks (layers 4,5 twice) with own controls
        physical = 11 * block_matrices(4, 1536)
        gate = D * H + H  # attn_gate: nn.Linear(512, 8, bias=True)
        controls = 13 * (2 * D + 2 * D + H + gate + 2)  # scales, resid_mix, q_gain, gate, vr_lambda (2)
        skips = 6 * D  # 13 virtual layers: 6 encoder, 7 decoder
        return tok + physical + controls + hash_embedding(2048, 128) + smear + skips + value_embedding(4)
    raise AssertionError(name)


# the seeds' own logs print these (model_params:...) for the three that ran
LOGGED = {"pr790": 33_568_904, "pr691": 26_993_756, "pr745": 27_051_758}


@pytest.mark.parametrize("name", SEEDS)
def test_dry_run_params_equal_the_seed_model(name):
    r = CliRunner().invoke(main, ["train", "--preset", name, "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["params"] == seed_params(name)
    if name in LOGGED:
        assert plan["params"] == LOGGED[name]
    m = plan["config"]["model"]
    assert (m["n_layer"], m["n_embd"], m["vocab_size"]) == (11, 512, 1024)  # #951 too: the script, not its title


def test_dry_run_table_and_errors():
    runner = CliRunner()
    r = runner.invoke(main, ["train", "--preset", "pr691", "--dry-run"])
    assert r.exit_code == 0 and "26,993,756" in r.output and "warmdown 3500 steps" in r.output
    bad = runner.invoke(main, ["train", "--preset", "pr691", "--scale", "huge", "--dry-run"])
    assert bad.exit_code == 2 and bad.stderr.strip() == "qpack: error: unknown scale 'huge'; known: full, tiny"
    bad = runner.invoke(main, ["train", "--preset", "pr999", "--dry-run"])
    assert bad.exit_code == 2 and "unknown preset 'pr999'" in bad.stderr


def test_seed_settings_that_are_not_shapes():
    p790, p951, p691, p745 = (preset_config(n) for n in ("pr790", "pr951", "pr691", "pr745"))
    assert (p790.qat_bits, p790.qat_threshold, p790.max_seconds) == (5, 0.5, 593.0)
    assert (p691.qat_bits, p691.qat_threshold, p691.ema_decay) == (6, 0.15, 0.997)
    assert (p745.crownq_mode, p745.crownq_lambda, p745.qat_bits) == ("record", 0.01, 6)
    assert p745.model.schedule == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10]
    assert (p951.ema_decay, p951.warmdown_iters, p951.matrix_lr, p951.qat_bits) == (0.999, 5000, 0.02, 0)
    for cfg in (p790, p951, p691, p745):
        assert cfg.global_batch_tokens == 786_432 and cfg.seq_len == 2048 and cfg.warmup_steps == 0
        assert cfg.weight_decay == cfg.adam_weight_decay == 0.04 and cfg.grad_clip == 0.3


@pytest.mark.parametrize("name", SEEDS)
def test_recipes_are_valid_qpack_settings(name):
    recipe = preset_recipe(name)
    CompressConfig(**recipe["compress"])  # raises on an unknown scheme or codec
    assert recipe["compress"]["budget"] == 16_000_000
    assert recipe["eval"]["ttt"] in TTT_RECIPES
    assert recipe["record"]["nproc"] == 8 and recipe["record"]["train_seconds"] == 600.0
    assert set(RECIPES) == set(SEEDS)
    assert preset_recipe("cpu-smoke") == {}


@pytest.mark.parametrize("name", SEEDS)
def test_tiny_scale_keeps_the_structure(name):
    full, tiny = preset_config(name), preset_config(name, "tiny")
    keep = ("n_layer", "recur_layers", "ve_layers", "resid_mix", "xsa_last", "attn_gate", "value_residual",
            "recur_own_controls", "activation", "unet_skips", "smear_gate", "ln_scale")
    assert all(getattr(full.model, k) == getattr(tiny.model, k) for k in keep)
    assert tiny.model.n_embd == 64 and tiny.device == "cpu" and tiny.max_seconds == 0 and tiny.max_steps == 10
    assert (full.qat_bits, full.crownq_mode) == (tiny.qat_bits, tiny.crownq_mode)

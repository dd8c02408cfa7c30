"""The reference trainer: overrides, presets, schedule, data stream, learning, checkpoints, resume, CLI."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from qpack.errors import QpackInputError
from qpack.models.gpt import build_from_config, count_params
from trainers.gpt.presets import preset_config
from trainers.gpt.train import (TokenStream, TrainConfig, lr_scale, next_batch, parse_overrides, read_metrics, train,
                                with_values)

torch.set_num_threads(1)
VOCAB = 48


def write_shard(path: Path, tokens) -> None:
    """The golf layout written independently of qpack: 256 int32 header words, then uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def repetitive_data(root: Path, period: int = 13, n_train: int = 6000, shards: int = 2) -> Path:
    """A data folder whose text is one short random pattern repeated: easy to learn, so loss must fall."""
    rng = np.random.default_rng(0)
    pattern = rng.integers(2, VOCAB, size=period)
    stream = np.tile(pattern, n_train // period + 1)[:n_train]
    root.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(stream, shards)):
        write_shard(root / f"toy_train_{i:06d}.bin", part)
    write_shard(root / "toy_val_000000.bin", np.tile(pattern, 30))
    return root


def tiny(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=2, n_kv_head=1,
                seq_len=16, batch_size=4, max_steps=20, warmup_steps=2, log_every=5, ckpt_every=0,
                val_tokens=256, threads=1, device="cpu")
    return with_values(TrainConfig(), {**base, **kw})


QUIET = dict(log=lambda line: None)


# ---------------------------------------------------------------------------------------------- config
def test_overrides_are_typed_and_reach_the_model():
    got = parse_overrides(["--n_layer=3", "seq_len=64", "--matrix_lr=0.02", "--compile=true", "--unet_skips=0",
                           "--recur_layers=1,2", "--activation=leaky_relu2", "--max-seconds=90"])
    assert got == {"n_layer": 3, "seq_len": 64, "matrix_lr": 0.02, "compile": True, "unet_skips": False,
                   "recur_layers": (1, 2), "activation": "leaky_relu2", "max_seconds": 90.0}
    assert type(got["max_seconds"]) is float and type(got["n_layer"]) is int
    cfg = with_values(TrainConfig(), got)
    assert cfg.model.n_layer == 3 and cfg.model.recur_layers == (1, 2) and cfg.seq_len == 64 and cfg.compile


@pytest.mark.parametrize("item, message", [
    ("--n_layers=3", r"unknown option 'n_layers'.*n_layer"),
    ("--bogus=1", r"unknown option 'bogus'"),
    ("--n_layer=three", r"--n_layer=three: expected int"),
    ("--matrix_lr=fast", r"--matrix_lr=fast: expected float"),
    ("--compile=maybe", r"--compile=maybe: expected bool"),
    ("--recur_layers=a,b", r"--recur_layers=a,b"),
    ("n_layer", r"not of the form --key=value"),
])
def test_override_errors_name_the_key(item, message):
    with pytest.raises(QpackInputError, match=message):
        parse_overrides([item])


def test_model_validation_surfaces_through_overrides():
    with pytest.raises(QpackInputError, match=r"GPTConfig\.n_head"):
        with_values(TrainConfig(), parse_overrides(["--n_embd=100", "--n_head=8"]))
    with pytest.raises(QpackInputError, match="seq_len"):
        train(with_values(TrainConfig(), {"seq_len": 0}))


def test_presets():
    smoke = preset_config("cpu-smoke")
    assert (smoke.model.n_layer, smoke.model.n_embd, smoke.seq_len, smoke.batch_size) == (4, 128, 256, 8)
    assert 0.55e6 < count_params(smoke.model) < 0.65e6
    small = preset_config("cpu-small")
    assert count_params(small.model) > count_params(smoke.model) and small.max_seconds > 0
    golf = preset_config("golf")
    m = golf.model
    assert (m.n_layer, m.n_embd, m.vocab_size, m.n_head, m.n_kv_head, m.mlp_mult) == (9, 512, 1024, 8, 4, 2.0)
    assert golf.device == "cuda"
    with pytest.raises(QpackInputError, match="known: cpu-small, cpu-smoke, golf"):
        preset_config("huge")


def test_lr_schedule_warmup_flat_warmdown_and_time_cap():
    cfg = with_values(TrainConfig(), dict(max_steps=100, warmup_steps=10, warmdown_frac=0.2))
    assert lr_scale(0, 0, cfg) == pytest.approx(0.1) and lr_scale(9, 0, cfg) == 1.0
    assert lr_scale(50, 0, cfg) == 1.0 and lr_scale(80, 0, cfg) == pytest.approx(1.0)
    assert lr_scale(90, 0, cfg) == pytest.approx(0.5) and lr_scale(100, 0, cfg) == 0.0
    timed = with_values(cfg, dict(max_seconds=60.0))
    assert lr_scale(20, 54.0, timed) == pytest.approx(0.5)  # the clock, not the step count, is ahead
    assert lr_scale(95, 10.0, timed) == pytest.approx(0.25)  # the step count is ahead


# ---------------------------------------------------------------------------------------------- data
def test_stream_windows_cross_shards_and_ranks_split_them(tmp_path):
    data = repetitive_data(tmp_path / "d", n_train=1000, shards=3)
    paths = sorted(data.glob("toy_train_*.bin"))
    everything = np.concatenate([np.fromfile(p, dtype="<u2", offset=1024) for p in paths])
    stream = TokenStream(paths, VOCAB)
    pos = 0
    for n in (100, 300, 250, 400, 333):  # wraps around the end once
        got = stream.window(n)
        want = np.concatenate([everything, everything])[pos % 1000: pos % 1000 + n + 1]
        assert np.array_equal(got, want)
        pos += n
    saved = stream.state()
    after = stream.window(50)
    fresh = TokenStream(paths, VOCAB)
    fresh.load_state(saved)
    assert np.array_equal(fresh.window(50), after)

    # two ranks see disjoint halves that together are exactly the one-process batch of twice the size
    a, b = TokenStream(paths, VOCAB), TokenStream(paths, VOCAB)
    one = TokenStream(paths, VOCAB)
    for _ in range(3):
        x0, y0 = next_batch(a, 2, 8, 0, 2, "cpu")
        x1, y1 = next_batch(b, 2, 8, 1, 2, "cpu")
        x, y = next_batch(one, 4, 8, 0, 1, "cpu")
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert torch.equal(x[:, 1:], y[:, :-1])


# ---------------------------------------------------------------------------------------------- training
def test_training_learns_a_repetitive_sequence_and_writes_a_loadable_model(tmp_path):
    data = repetitive_data(tmp_path / "d")
    summary = train(tiny(data, tmp_path / "run", max_steps=30, warmdown_frac=0.3), **QUIET)
    metrics = read_metrics(tmp_path / "run")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 31))
    assert metrics[-1] == {"step": 30, "val_loss": summary["val_loss"], "val_bpb": None, "final": True}
    assert losses[0] > 0.9 * math.log(VOCAB)  # starts near uniform
    assert max(losses[-5:]) < 0.25 * losses[0]
    assert summary["steps"] == 30 and summary["tokens"] == 30 * 4 * 16 and summary["val_bpb"] is None
    assert summary["val_loss"] < 0.25 * losses[0]

    final = torch.load(summary["checkpoint"], weights_only=True)
    assert set(final) == {"model", "config", "tokenizer", "data_manifest_hash", "seq_len"}
    assert final["seq_len"] == 16  # tiny()'s sequence length: eval's default window
    assert final["tokenizer"] is None and final["data_manifest_hash"] is None
    model = build_from_config(final["config"])
    model.load_state_dict(final["model"])
    seq = torch.from_numpy(np.fromfile(data / "toy_val_000000.bin", dtype="<u2", offset=1024)[:65].astype(np.int64))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(seq[None, :-1])[0], seq[1:])
    assert loss < 0.25 * losses[0]
    from qpack.checkpoint import load_state_dict

    sd, config, _ = load_state_dict(summary["checkpoint"])
    assert config == final["config"] and set(sd) == set(final["model"])
    log = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert log[0].startswith("config ") and log[1].startswith("libraries ") and log[2].startswith("hardware ")
    assert any(line.startswith("step 30/30 loss") and "tok/s" in line and "eta" in line for line in log)


def test_stopped_run_resumes_on_the_same_trajectory(tmp_path):
    """Stop after step 7 (as if killed), resume: losses and final weights equal the uninterrupted run's."""
    data = repetitive_data(tmp_path / "d")
    extras = dict(max_steps=14, grad_accum=2, ema_decay=0.8, qat_bits=6, qat_threshold=0.5, crownq_lambda=0.1,
                  weight_decay=0.01, ckpt_every=3, warmdown_frac=0.5, bigram_buckets=17, bigram_dim=8)
    whole = train(tiny(data, tmp_path / "whole", **extras), **QUIET)
    part = train(tiny(data, tmp_path / "part", stop_after=7, **extras), **QUIET)
    assert part["stopped"] and part["steps"] == 7 and not (tmp_path / "part" / "final.pt").exists()
    resumed = train(tiny(data, tmp_path / "part", **extras), **QUIET)
    assert resumed["steps"] == whole["steps"] == 14 and resumed["qat"] and resumed["ema"]
    assert read_metrics(tmp_path / "part") == read_metrics(tmp_path / "whole")
    a = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "resumed from" in (tmp_path / "part" / "train.log").read_text()


def test_sigkill_mid_run_then_resume_continues_the_loss_curve(tmp_path):
    data = repetitive_data(tmp_path / "d")
    settings = dict(max_steps=24, ckpt_every=2, log_every=1)
    cfg = tiny(data, tmp_path / "killed", **settings)
    args = [f"--{k}={v}" for k, v in dict(data=cfg.data, out=cfg.out, vocab_size=VOCAB, n_layer=2, n_embd=32,
                                          n_head=2, n_kv_head=1, seq_len=16, batch_size=4, warmup_steps=2,
                                          val_tokens=256, threads=1, device="cpu", **settings).items()]
    proc = subprocess.Popen([sys.executable, "-m", "trainers.gpt.train", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "killed" / "ckpt.pt"
    deadline = time.time() + 60
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (tmp_path / "killed" / "final.pt").exists()  # it really died mid-run
    saved_step = torch.load(ckpt, weights_only=True)["step"]
    assert 2 <= saved_step < 24
    (tmp_path / "killed" / ".ckpt.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-write leaves

    train(cfg, **QUIET)
    assert not list((tmp_path / "killed").glob(".*.tmp"))  # the resumed run cleared stale temp files
    reference = train(tiny(data, tmp_path / "whole", **settings), **QUIET)
    assert reference["steps"] == 24
    assert read_metrics(tmp_path / "killed") == read_metrics(tmp_path / "whole")


def test_time_cap_stops_the_run_and_drives_the_schedule(tmp_path):
    data = repetitive_data(tmp_path / "d")
    summary = train(tiny(data, tmp_path / "run", max_steps=100_000, max_seconds=1.5, log_every=1), **QUIET)
    assert 1 <= summary["steps"] < 100_000 and 1.5 <= summary["seconds"] < 5
    lines = [ln for ln in (tmp_path / "run" / "train.log").read_text().splitlines() if ln.startswith("step ")]
    last_scale = float(lines[-1].split("lr_scale ")[1].split()[0])
    assert last_scale < 0.3  # the warmdown followed the clock to near zero


def test_crownq_penalty_is_applied_in_warmdown(tmp_path):
    data = repetitive_data(tmp_path / "d")
    plain = train(tiny(data, tmp_path / "a", max_steps=8, warmdown_frac=0.5), **QUIET)
    pen = train(tiny(data, tmp_path / "b", max_steps=8, warmdown_frac=0.5, crownq_lambda=1e3), **QUIET)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert a[:4] == b[:4]  # identical before the warmdown starts
    wa = torch.load(plain["checkpoint"], weights_only=True)["model"]
    wb = torch.load(pen["checkpoint"], weights_only=True)["model"]
    # the penalty shrinks each row's absmax (the grid step), so the penalized matrices end up smaller
    key = "blocks.0.mlp.fc.weight"
    assert wb[key].abs().amax(dim=1).mean() < wa[key].abs().amax(dim=1).mean()


def test_val_bpb_counts_tokenizer_bytes(tmp_path):
    from qpack.data.shards import write_shard as qpack_write_shard
    from qpack.data.tokenizer import byte_counting, count_bytes, load_tokenizer, train_tokenizer

    text = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. " * 40).split(". ")
    data = tmp_path / "d"
    data.mkdir()
    train_tokenizer(text, data / "tokenizer.model", vocab_size=300)
    sp = load_tokenizer(data / "tokenizer.model")
    ids = np.concatenate([[1, *sp.encode(t)] for t in text]).astype(np.uint16)
    vocab = sp.get_piece_size()
    qpack_write_shard(data / "x_train_000000.bin", ids)
    qpack_write_shard(data / "x_val_000000.bin", ids[:400])
    summary = train(tiny(data, tmp_path / "run", vocab_size=vocab, max_steps=6, val_tokens=320), **QUIET)
    val = ids[:321].astype(np.int64)
    nbytes = count_bytes(val[1:], val[:-1], *byte_counting(sp, vocab))
    assert nbytes == len(sp.decode(val[1:].tolist()).encode("utf-8"))  # the text those tokens decode to
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] * 320 / math.log(2) / nbytes, rel=1e-9)
    final = torch.load(summary["checkpoint"], weights_only=True)
    assert final["tokenizer"] == str((data / "tokenizer.model").resolve())


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_train_prints_json_and_reports_errors_in_one_line(tmp_path):
    from qpack.cli import main

    data = repetitive_data(tmp_path / "d")
    runner = CliRunner()
    args = ["train", "--preset", "cpu-smoke", "--data", str(data), "--out", str(tmp_path / "run"), "--json",
            f"--vocab_size={VOCAB}", "--n_layer=1", "--n_embd=16", "--seq_len=8", "--batch_size=2", "--max_steps=3",
            "threads=1", "--val_tokens=64", "--val_every=0"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and Path(summary["checkpoint"]).is_file()
    bad = runner.invoke(main, ["train", "--preset", "cpu-smoke", "--n_layerz=2"])
    assert bad.exit_code == 2
    assert bad.stderr.strip().startswith("qpack: error: unknown option 'n_layerz'; did you mean n_layer")
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = runner.invoke(main, ["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")])
    assert missing.exit_code == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.output


# ---------------------------------------------------------------------------------------------- seed-record settings
def test_logged_val_after_late_qat_is_the_eval_of_final_pt(tmp_path):
    """QAT fake-quantizes in training only: the trainer's last val loss is that of the float weights final.pt holds."""
    from trainers.gpt.train import _nullcontext, evaluate

    data = repetitive_data(tmp_path / "d")
    cfg = tiny(data, tmp_path / "run", max_steps=10, qat_bits=3, qat_threshold=1.01)  # on right after warmup
    summary = train(cfg, **QUIET)
    assert summary["qat"]
    assert "late QAT on" in (tmp_path / "run" / "train.log").read_text()
    final = torch.load(summary["checkpoint"], weights_only=True)
    model = build_from_config(final["config"])
    model.load_state_dict(final["model"])
    val = np.fromfile(data / "toy_val_000000.bin", dtype="<u2", offset=1024).astype(np.int64)
    loss, _ = evaluate(model, val, cfg, torch.device("cpu"), _nullcontext, None, 0, 1)
    assert loss == summary["val_loss"]


def test_swa_final_weights_are_the_mean_of_the_collected_steps(tmp_path):
    from trainers.gpt.train import in_warmdown

    data = repetitive_data(tmp_path / "d")
    settings = dict(max_steps=8, warmdown_frac=0.5, ckpt_every=0)
    cfg = tiny(data, tmp_path / "swa", swa_every=1, swa_threshold=0.8, **settings)
    # steps whose weights SWA adds: low LR scale in the warmdown (step 0's warmup scale 0.5 does not count)
    collected = [s + 1 for s in range(8) if lr_scale(s, 0.0, cfg) < 0.8 and in_warmdown(s, 0.0, cfg)]
    assert collected == [6, 7, 8] and lr_scale(0, 0.0, cfg) < 0.8
    summary = train(cfg, **QUIET)
    snapshots = []
    for s in collected:  # the same run stopped after step s holds the weights after that step
        out = tmp_path / f"stop{s}"
        if s < 8:
            train(tiny(data, out, stop_after=s, **settings), **QUIET)
            snapshots.append(torch.load(out / "ckpt.pt", weights_only=True)["model"])
        else:
            snapshots.append(torch.load(tmp_path / "swa" / "ckpt.pt", weights_only=True)["model"])
    got = torch.load(summary["checkpoint"], weights_only=True)["model"]
    for k in got:
        want = sum(sd[k].float() for sd in snapshots) / len(snapshots)
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)
    assert "mean of 3 snapshots" in (tmp_path / "swa" / "train.log").read_text()


def test_seed_warmdown_counts_steps_or_mean_step_times():
    cfg = with_values(TrainConfig(), dict(max_steps=100, warmup_steps=0, warmdown_iters=20))
    assert lr_scale(79, 0, cfg) == 1.0 and lr_scale(80, 0, cfg) == 1.0
    assert lr_scale(90, 0, cfg) == pytest.approx(0.5) and lr_scale(100, 0, cfg) == 0.0
    timed = with_values(cfg, dict(max_steps=20_000, max_seconds=600.0))
    # 100 steps in 300 s: 3 s a step, so the warmdown is the last 20 * 3 = 60 s before the cap
    assert lr_scale(100, 300.0, timed) == 1.0
    assert lr_scale(180, 570.0, timed) == pytest.approx(30.0 / (20 * 570.0 / 180))


def test_record_crownq_applies_only_under_late_qat(tmp_path):
    data = repetitive_data(tmp_path / "d")
    common = dict(max_steps=8, warmdown_frac=0.5)
    plain = train(tiny(data, tmp_path / "a", **common), **QUIET)
    no_qat = train(tiny(data, tmp_path / "b", crownq_lambda=1e3, crownq_mode="record", **common), **QUIET)
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")  # no QAT: the record form never applies
    qat = dict(qat_bits=6, qat_threshold=0.6, **common)
    q = train(tiny(data, tmp_path / "c", **qat), **QUIET)
    qc = train(tiny(data, tmp_path / "d2", crownq_lambda=1e3, crownq_mode="record", **qat), **QUIET)
    wa = torch.load(q["checkpoint"], weights_only=True)["model"]["blocks.0.mlp.fc.weight"]
    wb = torch.load(qc["checkpoint"], weights_only=True)["model"]["blocks.0.mlp.fc.weight"]
    assert wb.abs().amax(dim=1).mean() < wa.abs().amax(dim=1).mean()
    assert plain["val_loss"] == no_qat["val_loss"]
    with pytest.raises(QpackInputError, match="crownq_mode"):
        train(tiny(data, tmp_path / "e", crownq_mode="both"), **QUIET)


def test_adam_weight_decay_uses_adamw_on_embeddings_and_scalars_only(tmp_path):
    from trainers.gpt.train import Trainer

    data = repetitive_data(tmp_path / "d")
    tr = Trainer(tiny(data, tmp_path / "r", adam_weight_decay=0.04, tie_embeddings=False), **QUIET)
    tr.raw = build_from_config(tr.cfg.model.to_dict())
    opts = tr._optimizers()
    kinds = [type(o).__name__ for o in opts]
    assert kinds == ["Muon", "AdamW", "Adam"]
    assert all(g["weight_decay"] == 0.04 for g in opts[1].param_groups)
    assert opts[2].param_groups[0]["params"] == [tr.raw.lm_head.weight]

"""The record pipeline end to end on a tiny corpus: the folder is complete, the artifact fits the budget, and a
separate `qpack eval` of the artifact reproduces the recorded val_bpb exactly."""
from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from qpack.cli import main
from qpack.data.build import build_data
from trainers.record import RecordConfig, code_files, run_record

WORDS = ("model weight budget byte token quantize entropy layer matrix codec scale row column sliding window "
         "the of and to in is that for with as on by this are be from").split()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    rng = random.Random(0)
    docs = []
    for i in range(40):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 400)))
        p = root / f"doc{i:02d}.txt"
        p.write_text(text.capitalize() + ".\n")
        docs.append(p)
    out = root / "data"
    build_data(out, corpus=docs, vocab=300, val_fraction=0.2, progress=False, log=lambda m: None)
    return out


def test_record_folder_and_independent_eval(data_dir, tmp_path):
    out = tmp_path / "record"
    budget = 120_000
    sub = run_record(RecordConfig(
        preset="cpu-smoke", budget=budget, out=str(out), data=str(data_dir), seed=1, progress=False,
        overrides=("--max_steps=6", "--vocab_size=300", "--n_layer=2", "--val_tokens=2048", "--val_every=0",
                   "--threads=1", "--log_every=3"),
        calib_tokens=2048, eval_tokens=1500, window=128, stride=64, mixer=True,
    ))
    for name in ("README.md", "submission.json", "record.log", "model.qpk", "compress.json", "eval.json",
                 "training_curve.png", "bit_allocation.png", "train/train.log", "train/metrics.jsonl"):
        assert (out / name).is_file(), name
    assert not (out / "train" / "ckpt.pt").exists()
    saved = json.loads((out / "submission.json").read_text())
    assert saved == json.loads(json.dumps(sub))
    assert sub["bytes_total"] == sub["bytes_model"] + sub["bytes_code"] <= budget
    assert sub["bytes_model"] == (out / "model.qpk").stat().st_size
    assert sub["bytes_code"] > 0 and len(code_files()) >= 3
    assert set(sub["modes"]) >= {"plain", "sliding", "mixer"}

    r = CliRunner().invoke(main, ["eval", str(out / "model.qpk"), "--data", str(data_dir), "--window", "128",
                                  "--stride", "64", "--max-tokens", "1500", "--json", "-q"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output)
    assert ev["modes"]["sliding"]["val_bpb"] == sub["val_bpb"]
    assert ev["modes"]["sliding"]["val_loss"] == sub["val_loss"]


CHALLENGE_FIELDS = {"author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code"}


@pytest.mark.parametrize("preset", ["pr790", "pr951", "pr691", "pr745"])
def test_seed_preset_records_end_to_end_at_tiny_scale(data_dir, tmp_path, preset):
    """Each seed preset at scale tiny: trains, compresses with its recipe's scheme, evaluates with its TTT recipe."""
    from trainers.gpt.presets import preset_recipe

    out = tmp_path / preset
    sub = run_record(RecordConfig(preset=preset, scale="tiny", budget=None, out=str(out), data=str(data_dir), seed=1,
                                  progress=False, overrides=("--vocab_size=300", "--val_tokens=1024", "--threads=1"),
                                  calib_tokens=1024, eval_tokens=700))
    for name in ("README.md", "submission.json", "record.log", "model.qpk", f"train_seed1.log", "code/train.py",
                 "code/gpt.py", "code/presets.py"):
        assert (out / name).is_file(), name
    assert CHALLENGE_FIELDS <= set(sub)
    assert sub["scale"] == "tiny" and sub["train_steps"] == 10
    assert sub["bytes_total"] <= sub["budget"] == sub["bytes_code"] + sub["params"] * 5 // 8
    recipe = preset_recipe(preset)
    compress = json.loads((out / "compress.json").read_text())
    # a tensor with an LQER correction on top still counts as its scheme
    schemes = {t["scheme"].removesuffix("+lqer") for t in compress["tensors"]} - {"passthrough", "fp16"}
    # the recipe's scheme; GPTQ falls back to GPTQ-lite where no Hessian was collected (the embeddings)
    assert recipe["compress"]["scheme"] in schemes and schemes <= {recipe["compress"]["scheme"], "gptq_lite"}
    assert "ttt" in sub["modes"] and ("ttt+mixer" in sub["modes"]) == recipe["eval"]["mixer"]
    assert sub["headline_mode"] == list(sub["modes"])[-1]
    assert "late QAT on" in (out / "train" / "train.log").read_text() or preset == "pr951"  # #951 ran no QAT
    code = sorted(p.name for p in (out / "code").iterdir())
    assert code == sorted(p.name for p in code_files())


@pytest.mark.slow
def test_record_trains_under_torchrun_with_several_processes(data_dir, tmp_path, request):
    """The multi-GPU path, here with 2 CPU processes (gloo): torchrun trains, the record reads its summary."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("starts 2 torchrun processes (about 20 s idle): run with -m slow")
    out = tmp_path / "ddp"
    sub = run_record(RecordConfig(preset="pr691", scale="tiny", nproc=2, budget=None, out=str(out), data=str(data_dir),
                                  seed=1, progress=False, overrides=("--vocab_size=300", "--val_tokens=1024"),
                                  calib_tokens=1024, eval_tokens=300))
    log = (out / "record.log").read_text()
    assert "torchrun: --standalone --nproc_per_node=2 -m trainers.gpt.train --preset=pr691 --scale=tiny" in log
    assert "world size 2" in (out / "train" / "train.log").read_text()
    assert sub["nproc"] == 2 and sub["train_tokens"] == 10 * 4 * 64 * 2 and (out / "model.qpk").is_file()

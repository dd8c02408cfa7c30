"""`qpack eval` end to end: a real tokenizer, golf shards, a small GPT; artifacts vs checkpoints; bad input."""
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import qpack.models.gpt as gpt
from qpack import models
from qpack.cli import main
from qpack.data import shards
from qpack.data import tokenizer as tok
from qpack.eval.run import EvalOptions, evaluate

VOCAB = 300


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldata")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "naïve", "café"]
    docs = [" ".join(rng.choice(words, 50)) + ".\n" for _ in range(80)]
    sp = tok.train_tokenizer(docs, d / "tokenizer.model", vocab_size=VOCAB, num_threads=1)
    ids = tok.encode_documents(sp, docs[:12])
    val = np.concatenate([np.concatenate([[tok.BOS_ID], x]) for x in ids])
    shards.write_shard(d / "tiny_val_000000.bin", val)
    shards.write_shard(d / "tiny_train_000000.bin", val)
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from qpack.checkpoint import save_state_dict

    torch.manual_seed(0)
    cfg = gpt.GPTConfig(vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=2, n_kv_head=1)
    model = gpt.GPT(cfg)
    with torch.no_grad():  # the trainer zero-inits some projections; random weights make the test sharper
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("evalmodel") / "model.pt"
    save_state_dict(path, model.state_dict(), cfg.to_dict())
    return path


def _eval(*args):
    res = CliRunner().invoke(main, ["eval", *map(str, args)])
    return res


def test_checkpoint_eval_json_and_table(data_dir, checkpoint):
    res = _eval(checkpoint, "--data", data_dir, "--window", 64, "--stride", 16, "--max-tokens", 400,
                "--mixer", "--ttt", "--ttt-chunk", 128, "--ttt-lr", 1e-3, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert list(out["modes"]) == ["plain", "sliding", "mixer", "ttt", "ttt+mixer"]
    assert out["mode"] == "ttt+mixer" and out["val_bpb"] == out["modes"]["ttt+mixer"]["val_bpb"]
    for m in out["modes"].values():
        assert m["tokens"] == 400 and m["bytes"] == out["bytes"] > 0
        assert m["val_bpb"] == pytest.approx(m["val_loss"] * m["tokens"] / math.log(2) / m["bytes"])
    assert out["modes"]["sliding"]["delta_bpb_vs_sliding"] == 0.0
    table = _eval(checkpoint, "--data", data_dir, "--window", 64, "--stride", 32, "--max-tokens", 200, "--mixer", "-q")
    assert table.exit_code == 0, table.output
    assert "val_bpb" in table.output and "mixer" in table.output and "sliding" in table.output


def test_a_model_trained_on_other_data_gets_a_warning(data_dir, checkpoint, tmp_path):
    from qpack.checkpoint import load_state_dict, save_state_dict
    from qpack.data.manifest import manifest_hash

    sd, cfg, _ = load_state_dict(checkpoint)
    (data_dir / "manifest.json").write_text('{"name": "tiny"}')
    for recorded, warned in ((manifest_hash({"name": "tiny"}), False), ("0" * 64, True)):
        path = tmp_path / f"{warned}.pt"
        torch.save({"model": sd, "config": cfg, "data_manifest_hash": recorded}, path)
        out = evaluate(path, data_dir, options=EvalOptions(window=64, stride=64, max_tokens=50))
        assert bool(out["warnings"]) == warned
    res = CliRunner().invoke(main, ["eval", str(path), "--data", str(data_dir), "--max-tokens", "50", "--json"])
    assert res.exit_code == 0 and "warning: " in res.stderr and json.loads(res.stdout)["warnings"]
    (data_dir / "manifest.json").unlink()


def test_bytes_match_the_decoded_val_text(data_dir, checkpoint):
    out = evaluate(checkpoint, data_dir, options=EvalOptions(window=64, stride=64))
    sp = tok.load_tokenizer(data_dir / "tokenizer.model")
    val = shards.load_split(data_dir, "val")
    text = "".join(sp.decode([int(t) for t in doc]) for doc in shards.split_at_bos(val) if len(doc))
    assert out["bytes"] == len(text.encode("utf-8"))
    assert out["tokens"] == val.size - 1


def test_artifact_scores_exactly_like_its_decompressed_checkpoint(data_dir, checkpoint, tmp_path):
    art, back = tmp_path / "m.qpk", tmp_path / "back.pt"
    r = CliRunner().invoke(main, ["compress", str(checkpoint), "-o", str(art), "--budget", "10MB", "--bits", "6",
                                  "--scheme", "rtn", "--min-numel", "256", "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["decompress", str(art), "-o", str(back), "-q"])
    assert r.exit_code == 0, r.output
    opts = EvalOptions(window=64, stride=32, max_tokens=300)
    a, b, orig = (evaluate(p, data_dir, options=opts) for p in (art, back, checkpoint))
    assert a["model_kind"] == "artifact" and b["model_kind"] == "checkpoint"
    for mode in ("plain", "sliding"):
        assert a["modes"][mode]["val_loss"] == b["modes"][mode]["val_loss"]
        assert a["modes"][mode]["val_bpb"] == b["modes"][mode]["val_bpb"]
    assert a["val_bpb"] != orig["val_bpb"]  # quantized: close to the original, not equal
    assert abs(a["val_bpb"] - orig["val_bpb"]) < 0.05


class FixedContext(torch.nn.Module):
    """A model with a hard context limit in its config (learned positions)."""

    def __init__(self, cfg):
        super().__init__()
        self.max_seq_len = cfg["max_seq_len"]
        self.emb = torch.nn.Embedding(cfg["vocab_size"], 8)
        self.pos = torch.nn.Embedding(cfg["max_seq_len"], 8)
        self.head = torch.nn.Linear(8, cfg["vocab_size"])

    def forward(self, idx):
        return self.head(self.emb(idx) + self.pos(torch.arange(idx.shape[1])))


@pytest.fixture
def fixed_context_model(tmp_path):
    from qpack.checkpoint import save_state_dict

    models.register_model("eval_fixed_context", FixedContext)
    cfg = {"arch": "eval_fixed_context", "vocab_size": VOCAB, "max_seq_len": 32}
    path = tmp_path / "fixed.pt"
    save_state_dict(path, FixedContext(cfg).state_dict(), cfg)
    yield path
    models.unregister_model("eval_fixed_context")


def test_default_window_is_the_models_context(data_dir, fixed_context_model):
    out = evaluate(fixed_context_model, data_dir, options=EvalOptions(max_tokens=100))
    assert out["window"] == 32 and out["stride"] == 16


def _one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("qpack: error:"), res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_input_is_one_line_exit_2(data_dir, checkpoint, fixed_context_model, tmp_path):
    from qpack.checkpoint import save_state_dict

    # a model whose vocabulary is not the tokenizer's
    cfg = gpt.GPTConfig(vocab_size=512, n_layer=1, n_embd=16, n_head=1, n_kv_head=1)
    wrong = tmp_path / "wrong.pt"
    save_state_dict(wrong, gpt.GPT(cfg).state_dict(), cfg.to_dict())
    _one_line_error(_eval(wrong, "--data", data_dir), "512", "300")
    # window / stride nonsense
    _one_line_error(_eval(checkpoint, "--data", data_dir, "--window", 32, "--stride", 64), "--stride")
    _one_line_error(_eval(checkpoint, "--data", data_dir, "--window", 0), "--window")
    _one_line_error(_eval(checkpoint, "--data", data_dir, "--window", 32, "--stride", 0), "--stride")
    _one_line_error(_eval(fixed_context_model, "--data", data_dir, "--window", 64), "maximum sequence length 32")
    _one_line_error(_eval(checkpoint, "--data", data_dir, "--max-tokens", 0), "--max-tokens")
    _one_line_error(_eval(checkpoint, "--data", data_dir, "--mixer", "--mixer-orders", "1,x"), "--mixer-orders")
    _one_line_error(_eval(checkpoint, "--data", data_dir, "--ttt", "--ttt-params", "lora:0"), "lora")
    # a tokenizer file that is not one
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00not a tokenizer" * 10)
    _one_line_error(_eval(checkpoint, "--data", data_dir, "--tokenizer", junk), "junk.model")
    # missing and malformed shards
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer.model").write_bytes((data_dir / "tokenizer.model").read_bytes())
    _one_line_error(_eval(checkpoint, "--data", empty), "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.model").write_bytes((data_dir / "tokenizer.model").read_bytes())
    raw = bytearray((data_dir / "tiny_val_000000.bin").read_bytes())
    raw[0:4] = (12345).to_bytes(4, "little")
    (bad / "tiny_val_000000.bin").write_bytes(bytes(raw))
    _one_line_error(_eval(checkpoint, "--data", bad), "tiny_val_000000.bin")
    # models that are not models
    _one_line_error(_eval(tmp_path / "nope.pt", "--data", data_dir), "nope.pt")
    bare = tmp_path / "bare.pt"
    save_state_dict(bare, {"w": torch.zeros(2, 2)})
    _one_line_error(_eval(bare, "--data", data_dir), "no model config")


class LossOnly(torch.nn.Module):
    """forward(input_ids, target_ids) -> loss and nothing else: eval needs --forward for it."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids, target_ids):
        logits = self.head(self.emb(input_ids))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_ids.flatten())


class Explodes(LossOnly):
    def forward_logits(self, input_ids):
        raise KeyError("rotary cache")


def logits_of(model, input_ids):
    return model.head(model.emb(input_ids))


def test_eval_arch_for_models_qpack_does_not_know(data_dir, tmp_path):
    from qpack.checkpoint import save_state_dict

    torch.manual_seed(0)
    model = LossOnly()
    bare = tmp_path / "loss_only.pt"
    save_state_dict(bare, model.state_dict())
    arch = f"{__name__}:LossOnly"
    _one_line_error(_eval(bare, "--data", data_dir, "--arch", arch), "needs target ids", "--forward")
    res = _eval(bare, "--data", data_dir, "--arch", arch, "--forward", f"{__name__}:logits_of", "--window", 32,
                "--max-tokens", 200, "--json")
    assert res.exit_code == 0, res.output
    # the same numbers, computed here: plain chunks of 32 (stride = window) through the same function
    ids = torch.as_tensor(shards.load_split(data_dir, "val")[:201].astype("int64"))
    nll = []
    with torch.no_grad():
        for a in range(0, 200, 32):
            b = min(200, a + 32)
            logp = torch.log_softmax(logits_of(model, ids[a:b].unsqueeze(0))[0].float(), -1)
            nll.append(-logp.gather(1, ids[a + 1:b + 1].unsqueeze(1)).squeeze(1).double())
    out = json.loads(res.output)
    assert out["modes"]["plain"]["val_loss"] == pytest.approx(torch.cat(nll).mean().item(), rel=1e-6)
    _one_line_error(_eval(bare, "--data", data_dir, "--arch", arch, "--forward", f"{__name__}:nope"), "no attribute")
    _one_line_error(_eval(bare, "--data", data_dir, "--arch", f"{__name__}:Explodes", "--window", 32, "-q"),
                    "Explodes.forward_logits(input_ids[", "KeyError")
    _one_line_error(_eval(bare, "--data", data_dir, "--arch", f"{__name__}:FixedContext"), "FixedContext")
    _one_line_error(_eval(bare, "--data", data_dir, "--arch", "torch.nn:Identity"), "unexpected")
    _one_line_error(_eval(bare, "--data", data_dir, "--arch", arch, "--distributed"), "--distributed", "torchrun")

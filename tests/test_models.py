"""Model rebuilding: entry points, registered names, --arch module:factory, and clear errors."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from qpack import models
from qpack.errors import QpackError, QpackInputError


class Tiny(nn.Module):
    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx):
        return self.head(self.emb(idx))


def tiny_factory(config: dict) -> nn.Module:
    return Tiny(config["vocab"], config["width"])


@pytest.fixture
def registered():
    models.register_model("tiny_test", tiny_factory)
    yield "tiny_test"
    models.unregister_model("tiny_test")


def test_build_registered_model(registered):
    model = models.build_model({"arch": registered, "vocab": 11, "width": 4})
    assert isinstance(model, Tiny)
    assert model(torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, 11)
    assert registered in models.model_names()


def test_duplicate_registration_raises(registered):
    with pytest.raises(QpackError, match="already registered"):
        models.register_model(registered, tiny_factory)


def test_unknown_arch_lists_known_ones(registered):
    with pytest.raises(QpackInputError) as err:
        models.build_model({"arch": "nope"})
    assert "unknown model arch 'nope'" in str(err.value) and registered in str(err.value)


def test_config_errors(registered):
    with pytest.raises(QpackInputError, match="names no \"arch\""):
        models.build_model({"vocab": 3})
    with pytest.raises(QpackInputError, match="JSON object"):
        models.build_model(["arch"])
    with pytest.raises(QpackInputError, match="does not fit arch 'tiny_test'.*KeyError"):
        models.build_model({"arch": registered, "vocab": 3})
    models.register_model("not_a_module", lambda cfg: 42)
    try:
        with pytest.raises(QpackError, match="not a torch.nn.Module"):
            models.build_model({"arch": "not_a_module"})
    finally:
        models.unregister_model("not_a_module")


def test_load_model_factory_from_typed_string():
    factory = models.load_model_factory(f"{__name__}:tiny_factory")  # this module, however pytest named it
    assert factory is tiny_factory
    model = models.build_model({"vocab": 5, "width": 2}, factory=factory)
    assert isinstance(model, nn.Module)
    assert models.load_model_factory("torch.nn:Linear") is nn.Linear
    for bad, words in (("no_colon", "module.path:factory"), ("x:y:z", "module.path:factory"),
                       ("no_such_module_qp:f", "cannot import"), ("torch.nn:NoSuchThing", "no attribute"),
                       ("torch:__version__", "not callable")):
        with pytest.raises(QpackInputError, match=words):
            models.load_model_factory(bad)


def test_entry_point_from_installed_distribution(tmp_path):
    """A fake installed plugin (dist-info with entry_points.txt) is found through the qpack.models group."""
    (tmp_path / "fake_qpack_models.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def build(config):
            return nn.Linear(config["n_in"], config["n_out"])
        def broken(config):
            raise RuntimeError("never called")
    """))
    dist = tmp_path / "fake_qpack_models-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-qpack-models\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[qpack.models]\nfakelin = fake_qpack_models:build\nmissing = fake_qpack_models_absent:build\n")
    script = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, sys.argv[1])
        from qpack import models
        from qpack.errors import QpackError
        m = models.build_model({"arch": "fakelin", "n_in": 3, "n_out": 5})
        out = {"type": type(m).__name__, "shape": list(m.weight.shape), "names": models.model_names()}
        try:
            models.build_model({"arch": "missing"})
        except QpackError as exc:
            out["missing"] = str(exc)
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["type"] == "Linear" and out["shape"] == [5, 3]
    assert {"fakelin", "missing", "gpt"} <= set(out["names"])
    assert "failed to load" in out["missing"] and "ModuleNotFoundError" in out["missing"]


def test_compress_and_eval_of_a_gpt_checkpoint_never_import_trainers(tmp_path):
    # the library stands alone: the reference GPT is qpack.models.gpt, built in as arch "gpt"
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, torch
        from qpack.models.gpt import GPTConfig, build_from_config
        import qpack.quant.base as qb
        assert {{"gptq", "gptq_lite", "rtn", "sdclip"}} <= set(qb.QUANTIZERS.names())  # registered on import
        cfg = GPTConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=2).to_dict()
        torch.manual_seed(0)
        model = build_from_config(cfg)
        torch.save({{"model": model.state_dict(), "config": cfg}}, r"{tmp_path / 'm.pt'}")
        import qpack
        from qpack.calibrate import build_model, collect
        sd = torch.load(r"{tmp_path / 'm.pt'}", weights_only=True)
        m = build_model(sd["model"], sd["config"], None)
        h = collect(m, torch.randint(0, 64, (512,)).numpy(), 64)
        qpack.compress(sd["model"], r"{tmp_path / 'm.qpk'}", model_config=cfg, hessians=h, fixed_bits=6)
        from qpack.eval.run import load_model
        loaded = load_model(r"{tmp_path / 'm.qpk'}")
        assert loaded.model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 64)
        bad = [name for name in sys.modules if name == "trainers" or name.startswith("trainers.")]
        assert not bad, bad
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]

"""The README's "Inside your train_gpt.py" snippet, taken from README.md and run as written on a CPU model."""
from __future__ import annotations

import re
from pathlib import Path

import torch

import qpack
import seedstyle

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet() -> str:
    """The first ```python block under the heading "## Inside your train_gpt.py"."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Inside your train_gpt.py", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README section has no python block"
    return match.group(1)


def test_readme_snippet_runs_on_a_cpu_model(tmp_path, monkeypatch, capsys):
    code = snippet()
    assert "qpack.calibrate(" in code and "qpack.compress(" in code and "qpack.load(" in code
    torch.manual_seed(0)
    model = seedstyle.SeedGPT()
    seedstyle.train(model, seedstyle.markov_tokens(20000, seed=2), steps=10)
    seedstyle.to_seed_dtypes(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    script = tmp_path / "train_gpt.py"
    script.write_text(Path(seedstyle.__file__).read_text())
    monkeypatch.chdir(tmp_path)
    # the names a seed's train_gpt.py has at that point
    env = {"base_model": model, "train_tokens": seedstyle.markov_tokens(20000, seed=4), "rank": 0, "device": "cpu",
           "__file__": str(script)}
    exec(compile(code, "README.md", "exec"), env)

    art = tmp_path / "final_model.qpk"
    result = env["result"]
    assert art.is_file() and Path(result.output).resolve() == art.resolve()
    assert result.bytes_total <= 16_000_000 == result.budget
    from qpack.codecs import make_codec

    assert result.bytes_code == len(make_codec("lzma").encode(script.read_bytes()))
    printed = capsys.readouterr().out
    assert f"{result.bytes_total:,}" in printed and f"{result.bytes_code:,}" in printed
    assert set(env["hessians"]) == {n for n, p in model.named_parameters() if n.endswith(".weight")}
    after = model.state_dict()
    loaded = qpack.load(art)
    assert all(torch.equal(after[k], loaded[k].to(after[k].dtype)) for k in after)  # the model now holds the artifact
    assert any(not torch.equal(after[k], before[k]) for k in after)

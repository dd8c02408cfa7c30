"""Corpus sources and cleaners, the document split, and `qpack data build` end to end on tiny corpora."""
from __future__ import annotations

import gzip
import json
import random
import shutil
import struct
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from qpack.cli import main
from qpack.data import build as build_mod
from qpack.data import corpus as C
from qpack.data.build import build_data, ensure_data, manifest_hash, read_manifest
from qpack.data.shards import find_shards, load_split, read_shard, split_at_bos
from qpack.data.tokenizer import byte_counting, count_bytes, load_tokenizer
from qpack.errors import QpackFormatError, QpackInputError

WORDS = ("the driver maps each page into memory while python objects call methods on classes and modules; "
         "errors are raised when flags are wrong. Über café 東京 3.14 “quoted” text").split(" ")


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        paras = []
        for _ in range(rng.randint(2, 6)):
            lines = ["    " * rng.randint(0, 1) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
                     for _ in range(rng.randint(1, 5))]
            paras.append("\n".join(lines))
        lead = " " if k % 7 == 0 else ""  # some documents open with a space: it must be counted
        out.append(f"{lead}Doc {k}: " + "\n\n".join(paras) + ("\n" if k % 3 else "  \n\n"))
    return out


def write_corpus(tmp_path, n_txt=8, n_jsonl=30):
    texts = make_texts(n_txt + n_jsonl)
    files = []
    for k, t in enumerate(texts[:n_txt]):
        p = tmp_path / f"doc{k}.txt"
        p.write_text(t, encoding="utf-8")
        files.append(p)
    j = tmp_path / "docs.jsonl"
    j.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts[n_txt:])),
                 encoding="utf-8")
    files.append(j)
    return files, texts


# --- cleaners ------------------------------------------------------------------------------------------------

RST = """\
.. SPDX-License-Identifier: GPL-2.0

.. _my_label:

=============
Page Title
=============

Intro with :ref:`a link <target>` and ``code`` and *emphasis* and **strong**,
see `the site <https://example.org>`_ and :c:func:`kmalloc` [#]_.

.. toctree::
   :maxdepth: 2

   other/page

Section
-------

Example::

    int x = *p;

.. note::

   Keep this text.

.. code-block:: c

   return 0;

..
   a comment block
   that spans lines

+-----+-----+
| a   | b   |
+-----+-----+
"""


def test_clean_rst_known_answer():
    out = C.clean_rst(RST)
    assert out == (
        "Page Title\n\n"
        "Intro with a link and code and emphasis and strong,\n"
        "see the site and kmalloc.\n\n"
        "Section\n\n"
        "Example:\n\n"
        "    int x = *p;\n\n"
        "   Keep this text.\n\n"
        "   return 0;\n\n"
        "| a   | b   |\n")


INFO = ("\x1f\nFile: python3.11.info,  Node: sys<4>,  Next: tarfile,  Prev: statistics<2>,  Up: Improved\n\n"
        "1.4.5.35 sys\n............\n\nAdd new *note sys.unraisablehook(): 263. function which can be\n"
        "overridden (*note gc.collect(): 6d0.).  See *note The\nTutorial: 1a.\n\n"
        "\x00\x08[image src=\"x.png\"\x00\x08]\n\n* Menu:\n\n* Whatever::\n* Other: Node 2.\n\n"
        "   ---------- Footnotes ----------\n\n   (1) https://bugs.python.org/issue\n")


def test_clean_info_known_answer():
    nodes = C.split_info("preamble\n" + INFO + "\x1f\nTag Table:\nNode: x\x7f1\n\x1f\nEnd Tag Table\n")
    assert [name for name, _ in nodes] == ["sys<4>"]
    assert C.clean_info_node(nodes[0][1]) == (
        "1.4.5.35 sys\n\nAdd new sys.unraisablehook() function which can be\n"
        "overridden (gc.collect()).  See The\nTutorial\n")


def test_normalize_maps_the_one_unroundtrippable_character():
    assert C.normalize_text("a\u2581b") == "a_b"


# --- files -------------------------------------------------------------------------------------------------

def test_file_corpus(tmp_path):
    files, texts = write_corpus(tmp_path, n_txt=2, n_jsonl=3)
    corpus = C.file_corpus(files)
    assert [d.text for d in corpus.docs] == texts
    assert [s["docs"] for s in corpus.sources] == [1, 1, 3]
    assert all(len(s["sha256"]) == 64 for s in corpus.sources)


@pytest.mark.parametrize("name, data, exc, words", [
    ("bad.jsonl", b'{"text": "ok"}\n{"text": 3}\n', QpackFormatError, "line 2"),
    ("bad.jsonl", b'{"text": "ok"}\nnot json\n', QpackFormatError, "line 2 is not JSON"),
    ("bad.txt", b"caf\xe9", QpackFormatError, "not UTF-8"),
    ("bad.csv", b"a,b", QpackInputError, ".txt"),
])
def test_file_corpus_errors(tmp_path, name, data, exc, words):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(exc, match=words):
        C.file_corpus([p])


# --- split -------------------------------------------------------------------------------------------------

def test_split_is_by_hash_deterministic_and_disjoint():
    docs = [C.Document(t, "x") for t in make_texts(400, seed=1)]
    train, val = C.split_train_val(docs, 0.1)
    assert len(train) + len(val) == 400 and 15 < len(val) < 70
    assert not {d.text for d in train} & {d.text for d in val}
    cut = 0.1 * 2.0**64
    assert all(C.doc_hash(d.text) < cut for d in val) and all(C.doc_hash(d.text) >= cut for d in train)
    # order of input and the other documents do not move a document between splits
    shuffled = docs[::-1][:200]
    train2, val2 = C.split_train_val(shuffled, 0.1)
    assert {d.text for d in val2} == {d.text for d in val} & {d.text for d in shuffled}
    assert [d.text for d in train2] == sorted((d.text for d in train2), key=C.doc_hash)


def test_small_corpus_still_has_val():
    docs = [C.Document(t, "x") for t in make_texts(30, seed=2)]
    train, val = C.split_train_val(docs, 0.001)
    assert len(val) == 1 and len(train) == 29
    assert val[0].text == min((d.text for d in docs), key=C.doc_hash)
    with pytest.raises(QpackInputError, match="at least 2"):
        C.split_train_val(docs[:1], 0.5)
    with pytest.raises(QpackInputError, match="val-fraction"):
        C.split_train_val(docs, 1.5)


def test_dedupe_and_cap():
    docs = [C.Document(t, "x") for t in ["aa", "bb", "aa", "cccc"]]
    assert [d.text for d in C.dedupe(docs)] == ["aa", "bb", "cccc"]
    capped = C.cap_bytes(C.dedupe(docs), 5)
    assert sum(len(d.text) for d in capped) <= 5 and capped
    assert C.cap_bytes(docs, None) == docs


def test_cap_does_not_skew_the_val_share():
    docs = [C.Document(t, "x") for t in make_texts(1000, seed=4)]
    total = sum(len(d.text.encode()) for d in docs)
    capped = C.cap_bytes(docs, total // 4)
    assert total // 4 - 2000 < sum(len(d.text.encode()) for d in capped) <= total // 4
    assert [d.text for d in capped] == [d.text for d in docs if d in capped]  # input order kept
    _, val = C.split_train_val(capped, 0.05)
    assert 0.02 < len(val) / len(capped) < 0.09


# --- fallback and Debian extraction (no network) ---------------------------------------------------------------

def test_python_fallback_is_fast_and_says_so():
    corpus = C.python_corpus(max_bytes=300_000)
    size = sum(len(d.text.encode()) for d in corpus.docs)
    assert 200_000 < size <= 300_000
    assert "apt-get is unavailable" in corpus.note
    assert {s["name"] for s in corpus.sources} == {"python-pydoc-topics", "python-stdlib"}
    assert sum(s["docs"] for s in corpus.sources) == len(corpus.docs)


def test_build_falls_back_when_apt_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(C.shutil, "which", lambda name: None)
    messages = []
    result = build_data(tmp_path / "d", vocab=400, val_fraction=0.05, max_bytes=250_000, progress=False,
                        log=messages.append)
    assert any("apt-get or dpkg-deb is not installed" in m for m in messages)
    assert any("using text that ships with Python" in m for m in messages)
    assert "apt-get is unavailable" in result.manifest["note"]
    assert result.manifest["splits"]["val"]["tokens"] > 0
    assert 200_000 < result.manifest["splits"]["train"]["bytes"] + result.manifest["splits"]["val"]["bytes"] <= 250_000


def _make_deb(root, package, files):
    pkg = root / f"{package}-src"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 9.9-1\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: test\n")
    for rel, data in files.items():
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    out = root / f"{package}_9.9-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "-Znone", str(pkg), str(out)], check=True, capture_output=True)
    return out


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_debian_extraction_and_cleaning_from_cached_debs(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    src = "usr/share/doc/linux-doc-6.1/html/_sources"
    body = "Some kernel text that is long enough to be a document of its own, with *markup* inside.\n"
    _make_deb(cache, "linux-doc-6.1", {
        f"{src}/a/one.rst.txt": ("Title\n=====\n\n" + body).encode(),
        f"{src}/translations/it/one.rst.txt": ("Titolo\n======\n\n" + body).encode(),
        f"{src}/b.rst.txt": (".. note::\n\n   " + body).encode(),
        "usr/share/doc/linux-doc-6.1/html/index.html": b"<html></html>",
    })
    _make_deb(cache, "python3.11-doc", {"usr/share/info/python3.11.info.gz": gzip.compress(INFO.encode())})
    logs = []
    corpus = C.debian_corpus(cache, log=logs.append)
    assert sum("extracting" in m for m in logs) == 2
    again = C.debian_corpus(cache, log=logs.append)  # the same .debs: extraction is reused
    assert sum("extracting" in m for m in logs) == 2
    assert [d.text for d in again.docs] == [d.text for d in corpus.docs] and again.sources == corpus.sources
    assert [d.source for d in corpus.docs] == ["linux-doc-6.1", "linux-doc-6.1", "python3.11-doc"]
    assert corpus.docs[0].text == "Title\n\n" + body.replace("*markup*", "markup")
    by_name = {s["name"]: s for s in corpus.sources}
    assert by_name["linux-doc-6.1"]["version"] == "9.9-1" and by_name["linux-doc-6.1"]["docs"] == 2
    assert len(by_name["python3.11-doc"]["sha256"]) == 64
    assert not (cache / "extract" / "linux-doc-6.1" / "usr/share/doc/linux-doc-6.1/html/index.html").exists()


# --- build ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    files, texts = write_corpus(root)
    result = build_data(root / "data", corpus=files, vocab=400, val_fraction=0.05, shard_tokens=3000,
                        progress=False, log=lambda m: None)
    return root, files, texts, result


def test_build_writes_a_complete_data_dir(built):
    root, files, texts, result = built
    m = result.manifest
    assert not result.reused
    assert m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"] == len(texts)
    assert m["splits"]["val"]["docs"] >= 1
    assert m["tokenizer"]["vocab_size"] == 400 and m["tokenizer"]["space_after_boundary_counts"]
    assert manifest_hash(m) == m["manifest_hash"] == read_manifest(root / "data")["manifest_hash"]
    assert len(m["splits"]["train"]["shards"]) >= 2  # shard_tokens=3000 forces several
    for split in ("train", "val"):
        tokens = load_split(root / "data", split, vocab_size=400)
        assert len(tokens) == m["splits"][split]["tokens"]
        assert tokens[0] == 1 and (tokens == 1).sum() == m["splits"][split]["docs"]
    assert [p.name for p in result.paths.train] == [p.name for p in find_shards(root / "data", "train")]


def test_val_bytes_equal_decoded_text_bytes(built):
    """bpb's denominator: bytes counted from the val tokens == UTF-8 bytes of the decoded val documents."""
    root, _, texts, result = built
    sp = load_tokenizer(result.paths.tokenizer)
    val = load_split(root / "data", "val").astype(np.int64)
    luts, after_boundary = byte_counting(sp, 400)
    counted = count_bytes(val[1:], val[:-1], luts, after_boundary)
    decoded = [sp.decode(doc[1:].tolist()) for doc in split_at_bos(val)]
    assert counted == sum(len(d.encode("utf-8")) for d in decoded) == result.manifest["splits"]["val"]["bytes"]
    assert set(decoded) <= set(texts)  # each val document decodes to one input document exactly
    train = load_split(root / "data", "train").astype(np.int64)
    train_docs = {sp.decode(doc[1:].tolist()) for doc in split_at_bos(train)}
    assert not train_docs & set(decoded) and train_docs | set(decoded) == set(texts)


def test_rebuild_is_reused_then_redone_on_new_settings(built, tmp_path):
    root, files, _, result = built
    again = build_data(root / "data", corpus=files, vocab=400, val_fraction=0.05, shard_tokens=3000,
                       progress=False, log=lambda m: None)
    assert again.reused and again.manifest == result.manifest
    # the same build elsewhere gives identical files
    other = build_data(tmp_path / "d2", corpus=files, vocab=400, val_fraction=0.05, shard_tokens=3000,
                       progress=False, log=lambda m: None)
    assert other.manifest["manifest_hash"] == result.manifest["manifest_hash"]
    for a, b in zip(result.paths.train + result.paths.val, other.paths.train + other.paths.val):
        assert a.read_bytes() == b.read_bytes()
    changed = build_data(tmp_path / "d2", corpus=files, vocab=420, val_fraction=0.05, shard_tokens=100_000,
                         progress=False, log=lambda m: None)
    assert not changed.reused and changed.manifest["tokenizer"]["vocab_size"] == 420
    assert [p.name for p in find_shards(tmp_path / "d2", "train")] == ["qpack_train_000000.bin"]


def test_ensure_data_reuses_and_accepts_foreign_shards(built, tmp_path, monkeypatch):
    root, _, _, result = built
    monkeypatch.setattr(build_mod, "build_data", lambda *a, **k: pytest.fail("must not rebuild"))
    paths = ensure_data(root / "data")
    assert paths == result.paths and paths.manifest_hash == result.manifest["manifest_hash"]
    golf = tmp_path / "fineweb10B_sp1024"
    golf.mkdir()
    for name in ("fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        (golf / name).write_bytes(struct.pack("<256i", 20240520, 1, 2, *([0] * 253)) + struct.pack("<2H", 1, 9))
    foreign = ensure_data(golf)
    assert foreign.tokenizer is None and foreign.manifest is None
    assert [p.name for p in foreign.val] == ["fineweb_val_000000.bin"]
    assert read_shard(foreign.train[0]).tolist() == [1, 9]


def test_build_refuses_a_dir_with_foreign_shards(tmp_path):
    (tmp_path / "fineweb_val_000000.bin").write_bytes(struct.pack("<256i", 20240520, 1, 0, *([0] * 253)))
    files, _ = write_corpus(tmp_path, 2, 10)
    with pytest.raises(QpackInputError, match="did not build"):
        build_data(tmp_path, corpus=files, vocab=400, progress=False, log=lambda m: None)


def test_corrupt_manifest_needs_force_then_rebuilds(tmp_path):
    files, _ = write_corpus(tmp_path, 2, 10)
    out = tmp_path / "d"
    build_data(out, corpus=files, vocab=400, progress=False, log=lambda m: None)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(QpackFormatError, match="--force"):
        build_data(out, corpus=files, vocab=400, progress=False, log=lambda m: None)
    again = build_data(out, corpus=files, vocab=400, force=True, progress=False, log=lambda m: None)
    assert not again.reused and read_manifest(out)["manifest_hash"] == again.manifest["manifest_hash"]


def test_cli_build_json_and_errors(tmp_path):
    files, _ = write_corpus(tmp_path, 4, 20)
    runner = CliRunner()
    args = ["data", "build", *sum((["--corpus", str(f)] for f in files), []), "--vocab", "400",
            "--out", str(tmp_path / "out")]
    res = runner.invoke(main, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["reused"] is False and out["splits"]["val"]["docs"] >= 1 and out["vocab_size"] == 400
    res = runner.invoke(main, args)
    assert res.exit_code == 0 and "reused" in res.stdout and "bytes/token" in res.stdout
    for bad, words in ((["--val-fraction", "1.5"], "val-fraction"), (["--max-bytes", "lots"], "size"),
                       (["--vocab", "10"], "--vocab")):
        res = runner.invoke(main, [*args, *bad, "--force"])
        assert res.exit_code == 2 and words in res.stderr and "Traceback" not in res.output
    with pytest.raises(QpackInputError, match="cannot use as a data directory"):
        build_data(files[0], corpus=files, vocab=400, progress=False)  # the out dir is a file
    one = tmp_path / "one.txt"
    one.write_text("just one document")
    res = runner.invoke(main, ["data", "build", "--corpus", str(one), "--out", str(tmp_path / "o1")])
    assert res.exit_code == 2 and "at least 2 documents" in res.stderr
    assert not (tmp_path / "o1" / "manifest.json").exists()

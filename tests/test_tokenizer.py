"""The round-tripping BPE tokenizer and parameter-golf's byte counting."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings, strategies as st

from qpack.data.tokenizer import (BOS_ID, SPACE, byte_counting, byte_luts, chunk_text, count_bytes,
                                  encode_documents, is_exact, load_tokenizer, tokenizer_settings, train_tokenizer)
from qpack.errors import QpackFormatError, QpackInputError, Reason

WORDS = ("the kernel module driver returns a value when called with flags; each page table entry holds bits "
         "for the process and memory map. Python objects have methods, classes and functions: def f(x): "
         "return x + 1. Über naïve café résumé 東京 — “quotes” and 3.14159 or 2024").split(" ")

TRICKY = [
    "  leading spaces", "trailing spaces   ", "multiple   inner    spaces", "\ttabs\tand\t\ttabs\t",
    "\n\nnewlines\n\n\nbetween\n", " ", "", "\n", "emoji 😀🚀 and ZWJ 👩‍💻 end", "unicode: Ωµ∑ 中文 ü",
    "mixed \t\n \r\n ws", "control \x00\x01\x7f chars", "a" * 5000, " leading and double  ",
    "combining e\u0301 vs é and ﬁ ligature",
]


def make_docs(n: int = 40, seed: int = 0) -> list[str]:
    """Pseudo-English documents with code-like lines, indentation and odd whitespace."""
    rng = random.Random(seed)
    docs = []
    for k in range(n):
        lines = []
        for _ in range(rng.randint(6, 20)):
            indent = rng.choice(["", "", "    ", "\t"])
            lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))))
            if rng.random() < 0.2:
                lines.append("")
        docs.append(f"Document {k}\n" + "\n".join(lines) + "\n")
    return docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    sp = train_tokenizer(make_docs(), path, vocab_size=400)
    return sp, path


def test_round_trip_on_tricky_text(tok):
    sp, _ = tok
    for text in TRICKY:
        ids = sp.encode(text)
        assert sp.decode(ids) == text, repr(text)
        [doc] = encode_documents(sp, [text])
        assert sp.decode(doc.tolist()) == text


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=SPACE), max_size=200))
def test_round_trip_any_text(tok, text):
    sp, _ = tok
    assert sp.decode(sp.encode(text)) == text
    assert sp.decode(encode_documents(sp, [text])[0].tolist()) == text


def test_chunks_concatenate_to_the_text():
    text = "para one\nline\n\npara two\n\n\n" + "x" * 9000 + "\n" + "y\n" * 3000
    chunks = chunk_text(text)
    assert "".join(chunks) == text
    assert max(map(len, chunks)) <= 4000 and len(chunks) > 3


def test_special_ids_and_settings(tok):
    sp, _ = tok
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.get_piece_size() == 400
    info = tokenizer_settings(sp)
    assert info["exact"] and info["space_after_boundary_counts"] and info["vocab_size"] == 400


def test_training_is_deterministic(tmp_path):
    docs = make_docs(20, seed=3)
    train_tokenizer(docs, tmp_path / "a.model", vocab_size=360)
    train_tokenizer(docs, tmp_path / "b.model", vocab_size=360)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()


def test_bad_vocab_is_an_input_error(tmp_path):
    with pytest.raises(QpackInputError, match="--vocab"):
        train_tokenizer(["abc"], tmp_path / "x.model", vocab_size=100)


def test_load_tokenizer(tok, tmp_path):
    sp, path = tok
    loaded = load_tokenizer(path)
    assert loaded.encode("the kernel") == sp.encode("the kernel")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01 this is not a sentencepiece model" * 10)
    with pytest.raises(QpackFormatError) as err:
        load_tokenizer(junk)
    assert "not a sentencepiece tokenizer" in str(err.value) and str(junk) in str(err.value)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(QpackFormatError):
        load_tokenizer(empty)
    with pytest.raises(QpackFormatError) as err:
        load_tokenizer(tmp_path / "missing.model")
    assert err.value.reason == Reason.IO


def _golf_like(docs) -> spm.SentencePieceProcessor:
    """A tokenizer trained with parameter-golf's settings (nmt_nfkc, squeezed whitespace, unk 3, pad 0)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=buf, model_type="bpe",
                                   vocab_size=320, byte_fallback=True, split_digits=True,
                                   normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0,
                                   bos_id=1, eos_id=2, unk_id=3, character_coverage=0.999, minloglevel=2,
                                   num_threads=1)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def _doc_stream(sp, docs):
    ids = [[BOS_ID] + sp.encode(d) for d in docs]
    return np.array([t for doc in ids for t in doc], dtype=np.int64)


def test_exact_count_equals_utf8_bytes(tok):
    """Our tokenizer: counted bytes of a BOS-separated stream == UTF-8 length of the text, documents
    opening with a space included (that "▁" after BOS is real text)."""
    sp, _ = tok
    docs = TRICKY + make_docs(10, seed=9)
    stream = _doc_stream(sp, docs)
    luts, after_boundary = byte_counting(sp)
    assert after_boundary is True
    counted = count_bytes(stream[1:], stream[:-1], luts, after_boundary)
    assert counted == sum(len(d.encode("utf-8")) for d in docs)
    # golf's rule on the same stream drops each document-opening space and counts "▁" inside pieces as 3 bytes
    golf = count_bytes(stream[1:], stream[:-1], byte_luts(sp))
    assert golf != counted


def test_golf_rule_matches_text_for_golf_tokenizer():
    """A golf-style tokenizer: stripped single-spaced text has exactly as many bytes as golf's rule counts."""
    docs = [" ".join(d.split()) for d in make_docs(30, seed=5)]
    sp = _golf_like(docs)
    assert not is_exact(sp)
    luts, after_boundary = byte_counting(sp)
    assert after_boundary is False
    texts = [" ".join(d.split()) for d in make_docs(5, seed=11)]
    assert all(sp.decode(sp.encode(t)) == t for t in texts)
    stream = _doc_stream(sp, texts)
    assert count_bytes(stream[1:], stream[:-1], luts) == sum(len(t.encode("utf-8")) for t in texts)


def test_byte_luts_known_pieces(tok):
    sp, _ = tok
    base, lead, boundary = byte_luts(sp, vocab_size=480)
    assert base.dtype == np.int16 and lead.dtype == np.bool_ and boundary.dtype == np.bool_
    assert len(base) == 480 and boundary[400:].all() and (base[400:] == 0).all()
    for i in (0, 1, 2):  # unk, bos, eos
        assert boundary[i] and base[i] == 0 and not lead[i]
    byte_a = sp.piece_to_id("<0x41>")
    assert base[byte_a] == 1 and not boundary[byte_a] and not lead[byte_a]
    seen = set()
    for i in range(3, 400):
        piece = sp.id_to_piece(i)
        seen.add(piece)
        if piece == SPACE * 2:  # a whitespace-only piece: golf counts the inner "▁" as 3 bytes, exact as 1
            assert lead[i] and base[i] == 3
            assert byte_luts(sp, exact=True)[0][i] == 1
        if piece == SPACE + "the":
            assert lead[i] and base[i] == 3
    assert SPACE * 2 in seen and SPACE + "the" in seen  # the known answers above were checked


def test_count_bytes_by_hand(tok):
    sp, _ = tok
    luts = byte_luts(sp)
    the = sp.piece_to_id(SPACE + "the")
    assert sp.id_to_piece(the) == SPACE + "the"
    byte_x = sp.piece_to_id("<0x78>")
    tokens = np.array([the, byte_x, the])
    prev = np.array([BOS_ID, the, byte_x])
    # "▁the" after BOS: 3 (golf drops the space) ; byte: 1 ; "▁the" after a byte: 3 + 1
    assert count_bytes(tokens, prev, luts) == 3 + 1 + 4
    assert count_bytes(tokens, prev, luts, space_after_boundary_counts=True) == 4 + 1 + 4
    with pytest.raises(QpackInputError):
        count_bytes(tokens, prev[:2], luts)

"""val_loss and val_bpb against values computed by hand, and byte counts against the decoded text."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from qpack.eval.bpb import ByteLUTs, bits_per_byte, score, target_bytes
from qpack.eval.sliding import sliding_nll


class Uniform(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab)


# pieces: 0 <unk>, 1 <s>, 2 </s>, 3 <0x41>, 4 "▁the", 5 "cat", 6 "▁", 7 "é"
HAND = ByteLUTs(
    base_bytes=np.array([0, 0, 0, 1, 3, 3, 0, 2]),
    has_leading_space=np.array([0, 0, 0, 0, 1, 0, 1, 0], dtype=bool),
    is_boundary=np.array([1, 1, 1, 0, 0, 0, 0, 0], dtype=bool),
)
TOKENS = np.array([1, 4, 6, 5, 7, 1, 4, 3])  # <s> ▁the ▁ cat é <s> ▁the <0x41>


def test_target_bytes_by_hand():
    # ▁the after <s>: 3 (golf skips the space after a boundary); ▁ after ▁the: 0 + 1; cat 3; é 2; <s> 0;
    # ▁the after <s>: 3; byte piece 1
    assert target_bytes(TOKENS, HAND).tolist() == [3, 1, 3, 2, 0, 3, 1]
    # a tokenizer without dummy prefix: the "▁" after <s> is a real space
    assert target_bytes(TOKENS, HAND, space_after_boundary_counts=True).tolist() == [4, 1, 3, 2, 0, 4, 1]
    # the tuple byte_luts returns works the same
    luts = (HAND.base_bytes, HAND.has_leading_space, HAND.is_boundary)
    assert target_bytes(TOKENS, luts).tolist() == [3, 1, 3, 2, 0, 3, 1]


def test_val_bpb_of_a_uniform_model_by_hand():
    nll = sliding_nll(Uniform(8), TOKENS, 4, 2)
    s = score(nll, target_bytes(TOKENS, HAND))
    # 7 targets, each ln 8 nats = 3 bits; 13 bytes
    assert s.tokens == 7 and s.bytes == 13
    assert s.val_loss == pytest.approx(math.log(8), rel=1e-6)
    assert s.val_bpb == pytest.approx(21 / 13, rel=1e-6)
    s2 = score(nll, target_bytes(TOKENS, HAND, True))
    assert s2.val_bpb == pytest.approx(21 / 15, rel=1e-6)


def test_val_bpb_with_known_probabilities():
    # probabilities 1/2, 1/4, 1/8 over 2 + 1 + 1 bytes: (1 + 2 + 3) bits / 4 bytes
    nll = np.log([2.0, 4.0, 8.0])
    s = score(nll, np.array([2, 1, 1]))
    assert s.val_bpb == pytest.approx(1.5) and s.val_loss == pytest.approx(np.log(64) / 3)
    assert bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)


def test_bad_inputs():
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)
    with pytest.raises(ValueError):
        score(np.zeros(3), np.ones(2))
    with pytest.raises(ValueError):
        target_bytes(np.array([1, 99]), HAND)
    with pytest.raises(ValueError):
        ByteLUTs(np.zeros(3), np.zeros(2, bool), np.zeros(3, bool))


def test_round_trip_tokenizer_bytes_equal_the_text(tmp_path):
    import qpack.data.tokenizer as tok
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "naïve", "café", "déjà", "vu", "x", "ünïcödé", "  ", "\t"]
    docs = [" ".join(rng.choice(words, 40)) + "\n\n  indented line\n" for _ in range(60)]
    sp = tok.train_tokenizer(docs, tmp_path / "t.model", vocab_size=300, num_threads=1)
    luts, flag = tok.byte_counting(sp)
    assert flag  # the project's tokenizer keeps text exactly
    val = docs[:5]
    stream = np.concatenate([np.concatenate([[tok.BOS_ID], ids]) for ids in tok.encode_documents(sp, val)])
    nbytes = int(target_bytes(stream, luts, flag).sum())
    assert nbytes == sum(len(d.encode("utf-8")) for d in val)
    # and the bits per byte of a uniform model follow from that count alone
    nll = sliding_nll(Uniform(300), stream, 64, 32)
    assert score(nll, target_bytes(stream, luts, flag)).val_bpb == pytest.approx(
        (stream.size - 1) * math.log2(300) / nbytes, rel=1e-6)


def test_golf_style_tokenizer_counts_the_stripped_text(tmp_path):
    """A tokenizer like parameter-golf's (dummy prefix, NFKC): golf's rule gives the bytes of each document."""
    import qpack.data.tokenizer as tok
    import io

    import sentencepiece as spm

    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "café"]
    docs = [" ".join(rng.choice(words, 30)) for _ in range(80)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=buf, vocab_size=300, model_type="bpe",
                                   byte_fallback=True, minloglevel=2, bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    luts, flag = tok.byte_counting(sp)
    assert not flag
    val = docs[:6]
    stream = np.concatenate([[1] + sp.encode(d) for d in val])
    assert int(target_bytes(stream, luts, flag).sum()) == sum(len(d.encode("utf-8")) for d in val)

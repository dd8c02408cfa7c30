"""Golf-format shards: an independent writer, byte-for-byte reads, and a clear error for each malformation."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qpack.data.shards import (find_shards, load_split, read_header, read_shard, shard_name, split_at_bos,
                               write_shard)
from qpack.errors import QpackFormatError, QpackInputError, Reason


def golf_bytes(tokens, magic=20240520, version=1, count=None) -> bytes:
    """A shard as parameter-golf lays it out, written with plain struct (independent of qpack)."""
    count = len(tokens) if count is None else count
    header = struct.pack("<256i", magic, version, count, *([0] * 253))
    return header + struct.pack(f"<{len(tokens)}H", *tokens)


def test_independent_writer_reads_back_byte_for_byte(tmp_path):
    tokens = [1, 0, 65535, 7, 1023, 1, 42, 256]
    p = tmp_path / "fineweb_val_000000.bin"
    p.write_bytes(golf_bytes(tokens))
    got = read_shard(p)
    assert got.dtype == np.uint16
    assert got.tolist() == tokens
    # and qpack's writer produces the very same bytes
    q = tmp_path / "qpack_val_000000.bin"
    assert write_shard(q, np.array(tokens)) == len(golf_bytes(tokens))
    assert q.read_bytes() == p.read_bytes()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 65535), max_size=300))
def test_round_trip_any_tokens(tmp_path_factory, tokens):
    p = tmp_path_factory.mktemp("s") / "x_train_000000.bin"
    write_shard(p, np.array(tokens, dtype=np.int64))
    assert p.read_bytes() == golf_bytes(tokens)
    assert read_shard(p).tolist() == tokens


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    p = tmp_path / "a_train_000000.bin"
    write_shard(p, [1, 2, 3])
    write_shard(p, [1, 5])  # overwrite
    assert read_shard(p).tolist() == [1, 5]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a_train_000000.bin"]
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask


def test_write_rejects_ids_outside_uint16(tmp_path):
    for bad in ([70000], [-1]):
        with pytest.raises(QpackInputError, match="0..65535"):
            write_shard(tmp_path / "b_val_000000.bin", bad)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("data, reason, words", [
    (golf_bytes([1, 2, 3], magic=12345), Reason.BAD_MAGIC, "magic 12345"),
    (golf_bytes([1, 2, 3], version=2), Reason.BAD_VERSION, "version 2"),
    (golf_bytes([1, 2, 3], count=5), Reason.TRUNCATED, "header says 5 tokens"),
    (golf_bytes([1, 2, 3], count=2), Reason.TRAILING, "header says 2 tokens"),
    (golf_bytes([1, 2, 3], count=-4), Reason.BAD_HEADER, "negative"),
    (golf_bytes([])[:600], Reason.TRUNCATED, "shorter than its 1024-byte header"),
    (golf_bytes([1, 2, 3], count=2**31 - 1), Reason.TRUNCATED, "header says 2147483647 tokens"),
])
def test_malformed_shards_give_clear_errors(tmp_path, data, reason, words):
    p = tmp_path / "bad_val_000000.bin"
    p.write_bytes(data)
    with pytest.raises(QpackFormatError) as err:
        read_shard(p)
    assert err.value.reason == reason
    assert words in str(err.value)
    assert str(p) in str(err.value)


def test_token_ids_beyond_vocab_are_rejected(tmp_path):
    p = tmp_path / "v_val_000000.bin"
    p.write_bytes(golf_bytes([1, 5, 1023, 1024, 3]))
    assert read_shard(p, vocab_size=1025).tolist() == [1, 5, 1023, 1024, 3]
    with pytest.raises(QpackFormatError) as err:
        read_shard(p, vocab_size=1024)
    assert err.value.reason == Reason.LIMIT
    assert "token id 1024" in str(err.value) and "position 3" in str(err.value)


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(QpackFormatError) as err:
        read_shard(tmp_path / "nope_val_000000.bin")
    assert err.value.reason == Reason.IO


def test_find_shards_orders_by_index_and_accepts_any_prefix(tmp_path):
    for k in (10, 2, 0):
        (tmp_path / f"fineweb_train_{k:06d}.bin").write_bytes(golf_bytes([1, k]))
    (tmp_path / "fineweb_val_000000.bin").write_bytes(golf_bytes([1, 99, 98]))
    (tmp_path / "notes.txt").write_text("not a shard")
    train = find_shards(tmp_path, "train")
    assert [p.name for p in train] == ["fineweb_train_000000.bin", "fineweb_train_000002.bin",
                                       "fineweb_train_000010.bin"]
    assert load_split(tmp_path, "train").tolist() == [1, 0, 1, 2, 1, 10]
    assert load_split(tmp_path, "val", vocab_size=1024).tolist() == [1, 99, 98]


def test_find_shards_errors(tmp_path):
    with pytest.raises(QpackFormatError, match="no val shards"):
        find_shards(tmp_path, "val")
    with pytest.raises(QpackFormatError, match="does not exist"):
        find_shards(tmp_path / "missing", "val")
    with pytest.raises(QpackInputError, match="unknown split"):
        find_shards(tmp_path, "test")
    (tmp_path / "a_val_000000.bin").write_bytes(golf_bytes([1]))
    (tmp_path / "b_val_000000.bin").write_bytes(golf_bytes([1]))
    with pytest.raises(QpackFormatError, match="several name prefixes"):
        find_shards(tmp_path, "val")


def test_read_header_checks_size_only(tmp_path):
    p = tmp_path / "h_val_000000.bin"
    p.write_bytes(golf_bytes(list(range(100))))
    assert read_header(p) == 100


def test_shard_name_and_split_at_bos():
    assert shard_name("fineweb", "val", 3) == "fineweb_val_000003.bin"
    with pytest.raises(QpackInputError):
        shard_name("x", "val", 10**6)
    docs = split_at_bos(np.array([1, 5, 6, 1, 7, 1, 1, 8], dtype=np.uint16))
    assert [d.tolist() for d in docs] == [[1, 5, 6], [1, 7], [1], [1, 8]]
    assert [d.tolist() for d in split_at_bos(np.array([9, 1, 4]))] == [[9], [1, 4]]

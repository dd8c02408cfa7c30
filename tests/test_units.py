"""Byte sizes: decimal units are powers of 10, binary units (spelled KiB, MiB) powers of 2."""
import pytest

from qpack.errors import QpackInputError
from qpack.units import parse_size


@pytest.mark.parametrize("text,expected", [
    ("16MB", 16_000_000), ("16 mb", 16_000_000), ("16000000", 16_000_000), ("0", 0),
    ("15.5MiB", 15 * 2**20 + 2**19), ("1KiB", 1024), ("1.5KB", 1500), ("2GB", 2 * 10**9),
    ("1GiB", 2**30), ("100B", 100), (".5MB", 500_000), (1234, 1234),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "16XB", "-1MB", "1e6", "16 M B", "1.2.3MB"])
def test_parse_size_rejects(text):
    with pytest.raises(QpackInputError):
        parse_size(text)


def test_fractional_bytes_round_down():
    assert parse_size("1.0000001KB") == 1000

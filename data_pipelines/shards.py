"""prepare-data: a corpus -> tokenized ArrayRecord shards, one record per document, plus a manifest.

Layout of a prepared directory:

  manifest.json                          written last: its presence means "complete"
  shards/<split>-00000-of-00008.array_record   records: uint16 tokens, <|endoftext|> first
  shards/<split>-00000-of-00008.json     per-shard sidecar: what the shard holds, its sha256
  index/<split>.npy                      int64 [documents, 4]: doc_id, shard, record, n_tokens
  documents.tsv                          doc_id, split, tokens, replaced, name (for people)

A shard is the unit of work: workers tokenize whole shards, write them under a temporary name
and rename them into place, then write the sidecar. A rerun skips every shard whose sidecar
matches the plan and whose bytes match the sidecar's sha256, so a killed run resumes where it
stopped, and nothing in the output depends on timing, worker count or order of completion
(byte-identical output on rerun or resume).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import queue
import sys
from dataclasses import dataclass

import numpy as np

from data_pipelines import corpora, fs
from data_pipelines.errors import DataError
from data_pipelines.tokenizer import EOT, cache_root, get_tokenizer, tokenizer_id

FORMAT = "bst_dist.prepared/1"
RECORD_DTYPE = "uint16"  # GPT-2 ids < 65536: half the bytes of int32
MARKER = ".bst_dist_prepared"  # marks a directory this module may write into
_LIST_LIMIT = 50  # names listed in the manifest per bad-input kind (counts are always full)


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    count: int
    docs: tuple[tuple[int, corpora.Doc], ...]  # (doc_id, doc)
    out: str
    cache: str
    text_field: str

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.count:05d}"

    def plan_hash(self) -> str:
        plan = [FORMAT, tokenizer_id(), self.text_field, self.name,
                [(i, d.name, d.files, d.size, d.line) for i, d in self.docs]]
        return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"  # per-process name: a stray worker of a killed run may race
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _dumps(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


# --------------------------------------------------------------------------------------------
# Planning


def _partition(sizes: list[int], n: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges, n of them, none empty, balanced by cumulative size."""
    cum = np.cumsum(np.asarray(sizes, dtype=np.float64))
    total = cum[-1]
    bounds = [0]
    for i in range(1, n):
        b = int(np.searchsorted(cum, total * i / n)) + 1
        b = max(b, bounds[-1] + 1)  # never empty
        b = min(b, len(sizes) - (n - i))  # leave one document for each shard still to come
        bounds.append(b)
    bounds.append(len(sizes))
    return list(zip(bounds[:-1], bounds[1:]))


def plan(docs: list[corpora.Doc], out: str, cache: str, text_field: str, num_shards: int) -> list[ShardTask]:
    """Doc ids are positions in name order over the whole corpus; each split's documents (in id
    order) are cut into min(num_shards, documents) contiguous shards."""
    tasks = []
    by_split: dict[str, list[tuple[int, corpora.Doc]]] = {}
    for doc_id, d in enumerate(docs):
        by_split.setdefault(d.split, []).append((doc_id, d))
    for split in sorted(by_split):
        items = by_split[split]
        n = min(num_shards, len(items))
        for i, (lo, hi) in enumerate(_partition([d.size for _, d in items], n)):
            tasks.append(ShardTask(split, i, n, tuple(items[lo:hi]), out, cache, text_field))
    return tasks


# --------------------------------------------------------------------------------------------
# Work: one shard


_progress: "mp.Queue | None" = None


def _init_worker(progress_queue) -> None:
    global _progress
    _progress = progress_queue


def _report(n: int = 1) -> None:
    if _progress is not None:
        _progress.put(n)


def _shard_paths(task: ShardTask) -> tuple[str, str]:
    base = os.path.join(task.out, "shards", task.name)
    return base + ".array_record", base + ".json"


def write_shard(task: ShardTask) -> dict:
    """Tokenize one shard's documents into its ArrayRecord file; returns its sidecar."""
    from array_record.python.array_record_module import ArrayRecordWriter

    enc = get_tokenizer(task.cache)
    path, sidecar_path = _shard_paths(task)
    tmp = f"{path}.tmp{os.getpid()}"
    writer = ArrayRecordWriter(tmp, "group_size:1")  # one record per chunk: cheap random access
    documents, empty = [], []
    try:
        for doc_id, doc in task.docs:
            text, replaced = corpora.read_document(doc, task.text_field)
            ids = enc.encode_ordinary(text)
            if ids:
                record = np.empty(len(ids) + 1, dtype=RECORD_DTYPE)
                record[0] = EOT
                record[1:] = ids
                writer.write(record.tobytes())
                documents.append([doc_id, len(documents), len(record), replaced, doc.name])
            else:
                empty.append([doc_id, doc.name])
            _report()
    finally:
        writer.close()
    os.replace(tmp, path)
    sidecar = {"plan": task.plan_hash(), "file": os.path.basename(path), "sha256": _sha256(path),
               "documents": documents, "empty": empty}
    _write_atomic(sidecar_path, _dumps(sidecar))
    return sidecar


def _done_sidecar(task: ShardTask) -> dict | None:
    """The shard's sidecar when the shard is finished and intact, else None (redo it)."""
    path, sidecar_path = _shard_paths(task)
    try:
        with open(sidecar_path, "rb") as f:
            sidecar = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if sidecar.get("plan") != task.plan_hash() or not os.path.exists(path):
        return None
    if _sha256(path) != sidecar.get("sha256"):
        return None
    return sidecar


def _run(tasks: list[ShardTask], workers: int, progress: bool, total_docs: int, done_docs: int) -> list[dict]:
    from tqdm import tqdm

    bar = tqdm(total=total_docs, initial=done_docs, unit="doc", desc="prepare-data", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        if workers <= 1 or len(tasks) <= 1:
            results = []
            q: queue.SimpleQueue = queue.SimpleQueue()
            _init_worker(q)
            try:
                for t in tasks:
                    results.append(write_shard(t))
                    bar.update(q.qsize())
                    while not q.empty():
                        q.get()
            finally:
                _init_worker(None)
            return results
        # spawn, not fork: the caller may be a JAX process with live threads.
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as pool:
            futures = [pool.submit(write_shard, t) for t in tasks]
            pending = set(futures)
            while pending:
                finished, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                for f in finished:
                    f.result()  # re-raise a worker's DataError here, at once
                try:
                    while True:
                        bar.update(q.get_nowait())
                except queue.Empty:
                    pass
            return [f.result() for f in futures]
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------
# The whole job


def _check_out_dir(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out}: exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)):
        raise DataError(f"--out {out}: folder is not empty and is not a prepared-data folder; "
                        "choose an empty or new folder")


def _remove_stale(out: str, tasks: list[ShardTask]) -> None:
    keep = set()
    for t in tasks:
        keep.update(os.path.basename(p) for p in _shard_paths(t))
    for f in os.listdir(os.path.join(out, "shards")):
        if f not in keep:  # shards of an earlier plan, or temporaries of a killed run
            os.remove(os.path.join(out, "shards", f))
    splits = {f"{t.split}.npy" for t in tasks}
    for f in os.listdir(os.path.join(out, "index")):
        if f not in splits:  # a split an earlier plan had, or temporaries of a killed run
            os.remove(os.path.join(out, "index", f))


def _assemble(out: str, corpus: str, source: str, options: dict, tasks: list[ShardTask],
              sidecars: list[dict], skipped: fs.Skipped | None = None, extra: dict | None = None) -> dict:
    splits, tsv = {}, ["doc_id\tsplit\ttokens\treplaced\tname"]
    empty_names, replaced_names = [], []
    n_empty = n_replaced_docs = n_replaced = 0
    lengths = []
    rows_by_split: dict[str, list] = {}
    for task, sc in zip(tasks, sidecars):
        s = splits.setdefault(task.split, {"documents": 0, "tokens": 0, "shards": []})
        tokens = sum(n - 1 for _, _, n, _, _ in sc["documents"])
        s["documents"] += len(sc["documents"])
        s["tokens"] += tokens
        s["shards"].append({"file": sc["file"], "documents": len(sc["documents"]), "tokens": tokens,
                            "bytes": os.path.getsize(os.path.join(out, "shards", sc["file"])),
                            "sha256": sc["sha256"]})
        for doc_id, record, n, replaced, name in sc["documents"]:
            rows_by_split.setdefault(task.split, []).append((doc_id, task.index, record, n))
            tsv.append(f"{doc_id}\t{task.split}\t{n - 1}\t{replaced}\t{name}")
            lengths.append(n - 1)
            if replaced:
                n_replaced_docs += 1
                n_replaced += replaced
                replaced_names.append(name)
        for _, name in sc["empty"]:
            n_empty += 1
            empty_names.append(name)
    index_sha = {}
    for split in sorted(splits):
        rows = np.asarray(sorted(rows_by_split.get(split, [])), dtype=np.int64).reshape(-1, 4)
        path = os.path.join(out, "index", f"{split}.npy")
        tmp = f"{path}.tmp{os.getpid()}.npy"
        np.save(tmp, rows)
        os.replace(tmp, path)
        index_sha[split] = _sha256(path)
    _write_atomic(os.path.join(out, "documents.tsv"), ("\n".join(tsv) + "\n").encode())
    manifest = {
        "format": FORMAT,
        "corpus": corpus,
        "source": source,
        "options": options,
        "tokenizer": tokenizer_id(),
        "record_dtype": RECORD_DTYPE,
        "documents": sum(s["documents"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "longest_document_tokens": max(lengths, default=0),
        "shortest_document_tokens": min(lengths, default=0),
        "splits": splits,
        "bad_input": {
            "empty_documents": n_empty,
            "empty_document_names": sorted(empty_names)[:_LIST_LIMIT],
            "documents_with_invalid_utf8": n_replaced_docs,
            "invalid_utf8_sequences_replaced": n_replaced,
            "invalid_utf8_document_names": sorted(replaced_names)[:_LIST_LIMIT],
            # left out while listing: {reason: {"count", "examples"}} (fs.list_files, bad JSONL lines)
            "skipped": skipped.as_dict() if skipped is not None else {},
        },
        "index_sha256": index_sha,
        **(extra or {}),
    }
    # One id for the whole prepared dataset: loader states and checkpoints name it.
    manifest["checksum"] = hashlib.sha256(_dumps(manifest)).hexdigest()
    return manifest


def prepare(corpus: str, src: str | None, out: str, *, num_shards: int = 8, workers: int | None = None,
            val_fraction: float = 0.05, text_field: str = "text", cache_dir: str | None = None,
            progress: bool | None = None, test_packages=None) -> dict:
    """Tokenize `corpus` from `src` into `out`; returns the manifest. Resumable and idempotent.
    test_packages: pysrc's held-out packages (None: its default list)."""
    if num_shards < 1:
        raise DataError(f"--num-shards: must be >= 1, got {num_shards}")
    cache = cache_root(cache_dir)
    if "://" in out:  # object storage: prepare in a local staging folder, then upload
        from bst_dist.storage import prepared as remote

        manifest = prepare(corpus, src, remote.staging_dir(out, cache), num_shards=num_shards, workers=workers,
                           val_fraction=val_fraction, text_field=text_field, cache_dir=cache, progress=progress)
        remote.publish(remote.staging_dir(out, cache), out)
        return manifest
    out = os.path.abspath(os.path.expanduser(out))
    source = corpora.source_id(corpus, src)
    src = source if src else None
    skipped = fs.Skipped()
    docs = corpora.list_documents(corpus, src, cache=cache, val_fraction=val_fraction, text_field=text_field,
                                  skipped=skipped, test_packages=test_packages)
    _check_out_dir(out)
    for sub in ("shards", "index"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    with open(os.path.join(out, MARKER), "w") as f:
        f.write(FORMAT + "\n")

    tasks = plan(docs, out, cache, text_field, num_shards)
    sidecars = [_done_sidecar(t) for t in tasks]
    todo = [t for t, sc in zip(tasks, sidecars) if sc is None]
    done_docs = sum(len(t.docs) for t, sc in zip(tasks, sidecars) if sc is not None)
    if todo:
        if workers is None:
            workers = os.cpu_count() or 1
        workers = max(1, min(workers, len(todo)))
        if progress is None:
            progress = sys.stderr.isatty()
        results = iter(_run(todo, workers, progress, len(docs), done_docs))
        sidecars = [sc if sc is not None else next(results) for sc in sidecars]
    _remove_stale(out, tasks)
    options = {"val_fraction": val_fraction, "text_field": text_field, "num_shards": num_shards}
    extra = None
    if corpus == "pysrc":  # the package lists (the document names of the other corpora are in documents.tsv)
        from data_pipelines.pysrc import manifest_section

        tokens = {name: n - 1 for sc in sidecars for _, _, n, _, name in sc["documents"]}
        extra = {"pysrc": manifest_section(docs, tokens, test_packages)}
    manifest = _assemble(out, corpus, source, options, tasks, sidecars, skipped, extra)
    if not manifest["documents"]:  # every listed document was empty: nothing to train on
        n = manifest["bad_input"]["empty_documents"]
        raise DataError(f"corpus '{corpus}': {source or src}: no document has any text ({n} empty"
                        + (f"; skipped: {skipped.describe()}" if skipped.total() else "") + ")")
    _write_atomic(os.path.join(out, "manifest.json"), _dumps(manifest))
    return manifest


def summary(manifest: dict, out: str) -> str:
    """What a person reads after prepare-data: sizes per split and every bad-input count."""
    lines = [f"prepared {manifest['corpus']} -> {out}: {manifest['documents']} documents, "
             f"{manifest['tokens']:,} tokens (tokenizer {manifest['tokenizer']['name']})"]
    for split, s in sorted(manifest["splits"].items()):
        lines.append(f"  {split}: {s['documents']} documents, {s['tokens']:,} tokens, {len(s['shards'])} shards")
    bad = manifest["bad_input"]
    lines.append(f"  empty documents skipped: {bad['empty_documents']}"
                 + (f" ({', '.join(bad['empty_document_names'][:5])}{', ...' if bad['empty_documents'] > 5 else ''})"
                    if bad["empty_documents"] else ""))
    lines.append(f"  documents with invalid UTF-8 (decoded with replacement): {bad['documents_with_invalid_utf8']}"
                 f" ({bad['invalid_utf8_sequences_replaced']} byte sequences replaced)")
    skipped = bad.get("skipped") or {}  # manifests written before skip counts have none
    lines.append(f"  skipped while listing: {sum(r['count'] for r in skipped.values())}")
    for reason, r in skipped.items():
        more = ", ..." if r["count"] > len(r["examples"]) else ""
        lines.append(f"    {reason}: {r['count']} ({', '.join(r['examples'])}{more})")
    return "\n".join(lines)

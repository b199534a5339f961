"""File operations on a local path or a URL (gs://bucket/x, s3://bucket/x, file:///x): the OS for
local paths, fsspec (gcsfs, s3fs) for URLs. Whole-file reads and writes; no seek, no append on
object storage (see mirror.py for files that grow)."""

from __future__ import annotations

import os
from typing import Iterable

from bst_dist.errors import UserError


class BucketMissing(UserError, FileNotFoundError):
    """A gs:// or s3:// path whose bucket does not exist (or these credentials cannot see)."""


def is_url(path) -> bool:
    return "://" in str(path)


def _fs(url: str):
    import fsspec

    from bst_dist.storage.settings import EMULATOR_ENV, configure

    configure()
    if url.startswith("gs://") and os.environ.get(EMULATOR_ENV):
        # gcsfs's plain class: its default (extended) one probes the bucket type over gRPC, which
        # an emulator lacks; settings.py turns that off, but only for a gcsfs imported after it
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(token="anon"), url[len("gs://"):]
    return fsspec.core.url_to_fs(url)


def join(root, *parts: str) -> str:
    root = str(root)
    if is_url(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(root, *parts)


def exists(path) -> bool:
    path = str(path)
    if not is_url(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return fs.exists(p)


def isdir(path) -> bool:
    path = str(path)
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    return fs.isdir(p)


def listdir(path) -> list[str]:
    """Names directly under `path` (sorted); [] when it does not exist."""
    path = str(path)
    if not is_url(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, p = _fs(path)
    try:
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False)} - {""})
    except FileNotFoundError:
        return []


def makedirs(path) -> None:
    """Local: mkdir -p. Object storage has no folders: nothing to do (a bucket check instead)."""
    path = str(path)
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
    else:
        check_bucket(path)


def read_bytes(path) -> bytes:
    path = str(path)
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = _fs(path)
    return fs.cat_file(p)


def write_bytes(path, data: bytes) -> None:
    """Whole-file write; atomic on both sides (a local temp file renamed; an object upload is
    all-or-nothing)."""
    path = str(path)
    if not is_url(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, p = _fs(path)
    fs.pipe_file(p, data)


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove(path) -> None:
    path = str(path)
    if not is_url(path):
        if os.path.exists(path):
            os.remove(path)
        return
    fs, p = _fs(path)
    if fs.exists(p):
        fs.rm_file(p)


def bucket_of(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


def check_bucket(url, what: str = "") -> None:
    """Raise BucketMissing (one line) unless the bucket of `url` exists. Local paths pass."""
    url = str(url)
    if not is_url(url) or url.startswith("file://"):
        return
    scheme, bucket = url.split("://", 1)[0], bucket_of(url)
    fs, _ = _fs(url)
    try:
        ok = fs.exists(bucket)
    except Exception as e:  # noqa: BLE001 - unreachable endpoint, refused credentials
        raise BucketMissing(f"{what + ': ' if what else ''}{url}: cannot reach bucket {bucket!r} "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not ok:
        raise BucketMissing(f"{what + ': ' if what else ''}{url}: bucket {scheme}://{bucket} does not exist "
                            "(or these credentials cannot see it); create it or name another")


def _local_files(root: str) -> Iterable[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            yield os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")


def upload_tree(local: str, url: str, *, last: tuple[str, ...] = (), skip=lambda rel: False) -> None:
    """Copy every file under `local` to `url` (same relative paths); the files named in `last`
    go after all others, so that a reader who sees them sees a complete tree."""
    files = [r for r in _local_files(local) if not skip(r)]
    for rel in [r for r in files if r not in last] + [r for r in last if r in files]:
        with open(os.path.join(local, *rel.split("/")), "rb") as f:
            write_bytes(join(url, rel), f.read())


def download_tree(url: str, local: str, *, last: tuple[str, ...] = ()) -> None:
    """Copy every object under `url` into `local`; `last` as in upload_tree (written last here)."""
    fs, p = _fs(url)
    base = p.rstrip("/")
    rels = sorted(f[len(base) + 1:] for f in fs.find(base) if f.startswith(base + "/"))
    for rel in [r for r in rels if r not in last] + [r for r in last if r in rels]:
        write_bytes(os.path.join(local, *rel.split("/")), fs.cat_file(f"{base}/{rel}"))

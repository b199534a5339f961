"""Reading a corpus from a local folder or from object storage (gs://, s3://, file://, ...): the
corpus readers' view of bst_dist.storage (one storage layer for the whole project, configured
once: see bst_dist/storage/settings.py). Only listing and whole-file reads are needed."""

from __future__ import annotations

import os

from bst_dist.storage import exists, is_url, isdir, join, read_bytes  # noqa: F401

is_dir = isdir


def list_files(root: str, suffixes: tuple[str, ...]) -> list[tuple[str, int]]:
    """All files under `root` (recursive) ending in one of `suffixes`, as (relative path with '/'
    separators, size in bytes), sorted by path."""
    out = []
    if is_url(root):
        from bst_dist.storage.ops import _fs

        fs, base = _fs(root)
        base = base.rstrip("/")
        for path, info in fs.find(base, detail=True).items():
            rel = path[len(base) + 1:]
            if rel.endswith(suffixes):
                out.append((rel, int(info.get("size") or -1)))
        return sorted(out)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in filenames:
            if f.endswith(suffixes):
                full = os.path.join(dirpath, f)
                out.append((os.path.relpath(full, root).replace(os.sep, "/"), os.path.getsize(full)))
    return sorted(out)

"""Reading a corpus from a local folder or from object storage (gs://, s3://, file://, ...).

URLs go through tensorstore's key-value stores (installed with orbax), which read gs:// without
TensorFlow or gcsfs; local paths go through the OS. Only listing and whole-file reads are needed.
"""

from __future__ import annotations

import functools
import os
import stat


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


class Skipped:
    """What a listing or a reading left out, by reason: a count and the first few names, for the
    prepare report (nothing is skipped without being counted)."""

    LIMIT = 5

    def __init__(self):
        self.reasons: dict[str, dict] = {}

    def add(self, reason: str, name: str) -> None:
        r = self.reasons.setdefault(reason, {"count": 0, "examples": []})
        r["count"] += 1
        if len(r["examples"]) < self.LIMIT:
            r["examples"].append(name)

    def total(self) -> int:
        return sum(r["count"] for r in self.reasons.values())

    def as_dict(self) -> dict:
        return {k: dict(v) for k, v in sorted(self.reasons.items())}

    def describe(self) -> str:
        return ", ".join(f"{r['count']} {reason}" for reason, r in sorted(self.reasons.items()))


def _matches(name: str, suffixes: tuple[str, ...]) -> bool:
    return name.lower().endswith(tuple(s.lower() for s in suffixes))  # .TXT is a .txt file


def list_files(root: str, suffixes: tuple[str, ...], skipped: Skipped | None = None) -> list[tuple[str, int]]:
    """All regular files under `root` (recursive, following symlinks) whose name ends in one of
    `suffixes` (case-insensitive), as (relative path with '/' separators, size in bytes), sorted
    by path. Left out, and counted in `skipped` by reason: files with another extension, a
    symlink loop (a folder reached again through a link), a broken symlink, and anything that
    is not a regular file (a FIFO, a socket, a device: reading one could block for ever)."""
    skipped = skipped if skipped is not None else Skipped()
    out = []
    if is_url(root):
        kv = _kvstore(root)
        for key in kv.list().result():
            rel = key.decode()
            if _matches(rel, suffixes):
                out.append((rel, -1))  # size unknown without a read; -1 means "unknown"
            else:
                skipped.add(f"files not ending in {'/'.join(suffixes)}", rel)
        return sorted(out)
    want = "/".join(suffixes)
    seen: set[tuple[int, int]] = set()

    def walk(folder: str, prefix: str, above: frozenset) -> None:
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        if key in above:  # a link back to a folder above: walking it would never end
            skipped.add("symlink loops", prefix.rstrip("/"))
            return
        if key in seen:  # the same folder through a second link: its files are listed once
            skipped.add("folders reached again through a symlink", prefix.rstrip("/"))
            return
        seen.add(key)
        above = above | {key}
        try:
            # links last: a folder reached both directly and through a link is listed by its own path
            entries = sorted(os.scandir(folder), key=lambda e: (e.is_symlink(), e.name))
        except OSError as e:
            skipped.add("unreadable folders", f"{prefix or '.'} ({e.strerror})")
            return
        for entry in entries:
            rel = prefix + entry.name
            try:
                st = os.stat(entry.path)  # follows links
            except FileNotFoundError:
                skipped.add("broken symlinks", rel)
                continue
            except OSError as e:
                skipped.add("unreadable files", f"{rel} ({e.strerror})")
                continue
            if stat.S_ISDIR(st.st_mode):
                walk(entry.path, rel + "/", above)
            elif not stat.S_ISREG(st.st_mode):
                skipped.add("special files (not regular files)", rel)
            elif _matches(entry.name, suffixes):
                out.append((rel, st.st_size))
            else:
                skipped.add(f"files not ending in {want}", rel)

    walk(root, "", frozenset())
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

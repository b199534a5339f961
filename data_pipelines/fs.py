"""Reading a corpus from a local folder or from object storage (gs://, s3://, file://, ...): the
corpus readers' view of bst_dist.storage (one storage layer for the whole project, configured
once: see bst_dist/storage/settings.py). Only listing and whole-file reads are needed; local
folders are walked here, following symlinks, with everything left out counted."""

from __future__ import annotations

import os
import stat

from bst_dist.storage import exists, is_url, isdir, join, read_bytes  # noqa: F401

is_dir = isdir


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
        from bst_dist.storage.ops import _fs

        fs, base = _fs(root)
        base = base.rstrip("/")
        for path, info in sorted(fs.find(base, detail=True).items()):
            rel = path[len(base) + 1:]
            if _matches(rel, suffixes):
                out.append((rel, int(info.get("size") or -1)))
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

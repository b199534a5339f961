"""Per-file checksums of a checkpoint step, written after the step is complete, checked on restore.

Orbax checksums only the index of each array shard file (crc32c), not the array bytes, and not
the JSON items: a flipped byte in a state file restores silently with wrong values. So once a
step directory is final (Orbax renamed it into place), the primary process hashes every file in
it and writes `integrity.json` last:

  {"format": 1, "files": {"state/d/3f1c...": {"bytes": 41231, "sha256": "..."}, ...}}

A restore first compares the step directory against it: a missing, truncated, resized or changed
file (or a missing manifest) makes the step unverified, with a cause that names the file.
"""

from __future__ import annotations

import hashlib
import json

from etils import epath

MANIFEST = "integrity.json"
_MANIFEST_FORMAT = 1
_BLOCK = 1 << 22


class CorruptStep(Exception):
    """A step directory that does not match its manifest; the message is the cause, one line."""


def _files(step_dir: epath.Path) -> list[str]:
    out, todo = [], [(step_dir, "")]
    while todo:  # iterdir, not rglob: epath refuses `**` (one listing per folder on GCS)
        folder, prefix = todo.pop()
        for p in folder.iterdir():
            rel = prefix + p.name
            if p.is_dir():
                todo.append((p, rel + "/"))
            elif rel != MANIFEST and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def _sha256(path: epath.Path) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
            n += len(block)
    return n, h.hexdigest()


def has_manifest(step_dir) -> bool:
    return (epath.Path(step_dir) / MANIFEST).exists()


def write_manifest(step_dir) -> dict:
    """Hash every file of a complete step and write the manifest (atomically where the store
    can rename: a temporary name, then a rename, so a kill leaves no half manifest)."""
    step_dir = epath.Path(step_dir)
    files = {}
    for rel in _files(step_dir):
        n, digest = _sha256(step_dir / rel)
        files[rel] = {"bytes": n, "sha256": digest}
    manifest = {"format": _MANIFEST_FORMAT, "files": files}
    data = json.dumps(manifest, indent=0, sort_keys=True)
    target = step_dir / MANIFEST
    if str(step_dir).startswith(("gs://", "s3://")):
        target.write_text(data)  # an object write is all-or-nothing already
    else:
        tmp = step_dir / (MANIFEST + ".tmp")
        tmp.write_text(data)
        tmp.replace(target)
    return manifest


def verify(step_dir) -> None:
    """Raise CorruptStep naming the first problem; return when every listed file matches."""
    step_dir = epath.Path(step_dir)
    path = step_dir / MANIFEST
    if not path.exists():
        raise CorruptStep(f"no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptStep(f"{MANIFEST} is damaged ({type(e).__name__})") from None
    present = set(_files(step_dir))
    missing = sorted(set(files) - present)
    if missing:
        items = sorted({rel.split("/", 1)[0] for rel in missing if "/" in rel})
        what = f"item {', '.join(items)}" if items else "file"
        raise CorruptStep(f"{what} missing ({missing[0]}{' and more' if len(missing) > 1 else ''})")
    for rel, want in sorted(files.items()):
        n, digest = _sha256(step_dir / rel)
        if n != want["bytes"]:
            how = "truncated" if n < want["bytes"] else "grown"
            raise CorruptStep(f"{rel} is {how} ({n} bytes, {want['bytes']} written)")
        if digest != want["sha256"]:
            raise CorruptStep(f"{rel} does not match its checksum")

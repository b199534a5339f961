"""A local folder that stands for a run directory on object storage.

Object stores cannot append, and metrics.jsonl and TensorBoard's event files grow one line at a
time. So the writer appends to a local copy and `sync()` uploads every file that changed since
the last upload: the files on object storage stay readable during the run, at most one sync
behind. MetricsLogger syncs on its flushes, at most every `SYNC_EVERY_S` seconds, and at close.
For a local run directory the mirror is the directory itself and syncing does nothing.

    with mirror("gs://b/runs/x", pull=("metrics.jsonl",)) as local:   # pushes on exit
        ...write under local...
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from typing import Iterator

from bst_dist.storage import ops

SYNC_EVERY_S = 10.0


class Mirror:
    def __init__(self, remote: str, *, pull: tuple[str, ...] = ()):
        self.remote = str(remote)
        self.is_remote = ops.is_url(self.remote)
        self._sent: dict[str, tuple[int, int]] = {}
        self._last = 0.0
        if not self.is_remote:
            self.local = self.remote
            os.makedirs(self.local, exist_ok=True)
            return
        ops.check_bucket(self.remote, "run directory")
        tag = hashlib.sha256(self.remote.encode()).hexdigest()[:12]
        # the run's own basename last, so names derived from it (plot titles) stay the run's
        self._tmp = tempfile.mkdtemp(prefix=f"bst-dist-{tag}-")
        self.local = os.path.join(self._tmp, os.path.basename(self.remote.rstrip("/")) or "run")
        os.makedirs(self.local)
        for name in pull:  # files a resumed run continues (metrics truncated after the restore)
            src = ops.join(self.remote, name)
            if ops.exists(src):
                ops.write_bytes(os.path.join(self.local, name), ops.read_bytes(src))
                self._sent[name] = self._stat(name)

    def _stat(self, rel: str) -> tuple[int, int]:
        st = os.stat(os.path.join(self.local, *rel.split("/")))
        return st.st_size, st.st_mtime_ns

    def sync(self, *, force: bool = True) -> None:
        """Upload what changed (with force=False: only if SYNC_EVERY_S passed since the last)."""
        if not self.is_remote or (not force and time.monotonic() - self._last < SYNC_EVERY_S):
            return
        self._last = time.monotonic()
        for rel in ops._local_files(self.local):
            if ".tmp" in rel.rsplit("/", 1)[-1]:
                continue
            stat = self._stat(rel)
            if self._sent.get(rel) != stat:
                with open(os.path.join(self.local, *rel.split("/")), "rb") as f:
                    ops.write_bytes(ops.join(self.remote, rel), f.read())
                self._sent[rel] = stat

    def close(self) -> None:
        self.sync()
        if self.is_remote:
            shutil.rmtree(self._tmp, ignore_errors=True)


@contextlib.contextmanager
def mirror(remote: str, *, pull: tuple[str, ...] = ()) -> Iterator[str]:
    m = Mirror(remote, pull=pull)
    try:
        yield m.local
    finally:
        m.close()

"""Prepared data on object storage. ArrayRecord reads and writes local files only, so:

* prepare-data with a URL `--out`: prepare into a local staging folder of the cache
  (`<cache>/staging/<hash of the URL>`, kept, so a killed run resumes there), then upload it;
  manifest.json goes last, so a reader never sees a manifest without its shards.
* a URL `data.path`: copied once into the node's cache (`<cache>/remote/<hash of the URL>`), and
  again only when the manifest on storage differs from the copy's.
"""

from __future__ import annotations

import hashlib
import os

from bst_dist.storage import ops

MANIFEST = "manifest.json"


def _slot(cache: str, kind: str, url: str) -> str:
    return os.path.join(cache, kind, hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16])


def staging_dir(url: str, cache: str) -> str:
    ops.check_bucket(url, "--out")
    return _slot(cache, "staging", url)


def publish(local: str, url: str) -> None:
    # the temporaries of a killed local run are not part of the preparation
    ops.upload_tree(local, url, last=(MANIFEST,), skip=lambda rel: ".tmp" in rel)


def copy_slot(url: str, cache: str) -> str:
    return _slot(cache, "remote", url)


def local_copy(url: str, cache: str) -> str:
    """A local folder holding the prepared data at `url` (downloaded when new or changed); the
    caller holds a lock on it and reads the manifest from it."""
    ops.check_bucket(url, "data.path")
    remote_manifest = ops.join(url, MANIFEST)
    local = copy_slot(url, cache)
    if not ops.exists(remote_manifest):
        return local  # the caller's manifest check names what is missing
    want = ops.read_bytes(remote_manifest)
    have = os.path.join(local, MANIFEST)
    if os.path.exists(have):
        with open(have, "rb") as f:
            if f.read() == want:
                return local
        os.remove(have)  # a changed preparation: the manifest goes last again
    ops.download_tree(url, local, last=(MANIFEST,))
    return local

"""One place for every file a run reads or writes outside Orbax's own array I/O: local paths and
object storage (gs://, s3://, anything fsspec knows) behind the same few functions.

    from bst_dist import storage
    storage.exists(p) / isdir / listdir / makedirs / read_bytes / write_bytes / read_text / write_text
    storage.join(root, "a", "b")              # "/x/a/b" or "gs://b/x/a/b"
    storage.check_bucket(url, what)           # a missing bucket -> one UserError line
    storage.upload_tree(local, url) / download_tree(url, local)
    with storage.mirror(run_dir) as m: ...    # a local folder synced to run_dir (metrics, tb/, plots/)

Who goes through it: the run directory files (metrics.jsonl and eval.jsonl through a mirror,
job.yaml and summary.json directly, tb/ and plots/ through the mirror), prepared data
(prepare-data stages locally and uploads; a gs:// `data.path` is copied to the node's cache,
since ArrayRecord reads local files), data_pipelines.fs (corpus reads). Checkpoints: Orbax itself
writes arrays through tensorstore and metadata, the data position and the step folders through
etils.epath (gcsfs for gs://); `settings.configure()` points both at the same endpoint.

Why a package of its own (not under runs/): train/, runs/, launch/ and data_pipelines all use
it, and it imports nothing of bst_dist but bst_dist.errors, so anything may depend on it.
"""

from bst_dist.storage.ops import (  # noqa: F401
    BucketMissing, check_bucket, download_tree, exists, is_url, isdir, join, listdir, makedirs, read_bytes,
    read_text, remove, upload_tree, write_bytes, write_text,
)
from bst_dist.storage.mirror import Mirror, mirror  # noqa: F401
from bst_dist.storage.settings import EMULATOR_ENV, configure, worker_env  # noqa: F401

configure()

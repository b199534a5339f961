"""Saving and restoring the loader with Orbax, onto any process count.

Grain's handler (grain.checkpoint.CheckpointSave / CheckpointRestore) writes one
`process_<i>-of-<n>.json` per process and, on restore, reads the file of the *current* index and
count, so a checkpoint written by 2 processes cannot be found by 1 or 4. Every one of our files
holds the position of every lane (LaneLoader.get_state), so any one file restores any process.
`LaneRestore` is a drop-in for grain's CheckpointRestore that reads its own file when there is
one and otherwise any file of the checkpoint; `LaneSave` is grain's save under the same handler.
Same-count restores also work with grain's own CheckpointRestore (the files are Grain's).

  mngr.save(step, args=ocp.args.Composite(data=LaneSave(loader), ...))
  mngr.restore(step, args=ocp.args.Composite(data=LaneRestore(loader), ...))
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import orbax.checkpoint as ocp
from grain.checkpoint import CheckpointHandler as _GrainHandler

from data_pipelines.errors import DataError


def _process_index_and_count() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def read_state(directory) -> dict:
    """The loader state in a checkpoint's data item folder: this process's file when the
    checkpoint was written by this many processes, else the lowest-numbered file (all hold
    every lane)."""
    from etils import epath

    directory = epath.Path(directory)
    i, n = _process_index_and_count()
    own = directory / f"process_{i}-of-{n}.json"
    files = [own] if own.exists() else sorted(directory.glob("process_*-of-*.json"))
    if not files:
        raise DataError(f"{directory}: no loader state (process_*-of-*.json) in this checkpoint")
    return json.loads(files[0].read_text())


class LaneCheckpointHandler(_GrainHandler):
    def restore(self, directory, item: Any = None, args: Any = None):
        item = item or args.item
        item.set_state(read_state(directory))
        if hasattr(item, "start_prefetch"):  # plain Grain iterators (tests) have none
            item.start_prefetch()
        return item


@ocp.args.register_with_handler(LaneCheckpointHandler, for_save=True)
@dataclasses.dataclass
class LaneSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(LaneCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class LaneRestore(ocp.args.CheckpointArgs):
    item: Any

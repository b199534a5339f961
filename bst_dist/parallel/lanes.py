"""Which global batch rows (document lanes) a process feeds: the rows its devices hold.

Lane b is global batch row b on every layout: its documents come from the lane schedule, its
position from the loader state, its cache from row b of the checkpointed cache. On TPU the mesh
orders devices physically, so one process's devices sit at interleaved positions along the data
axis (v5p-32: process 0 holds rows 0, 1, 8, 9, 16, 17, 24, 25 of 32); a process therefore loads
the rows its devices hold, read off the batch sharding's index map, never a contiguous range.
`jax.make_array_from_process_local_data` takes a process's rows in ascending global order, which
is the order these functions return.
"""

from __future__ import annotations

import jax

from bst_dist.errors import UserError


class LaneAssignmentError(UserError, ValueError):
    """A lane assignment that leaves a lane unfed or names a row outside the batch."""


def device_rows(sharding: jax.sharding.Sharding, global_batch: int, devices=None) -> list[int]:
    """Sorted global rows held by `devices` (default: this process's addressable devices)."""
    index_map = sharding.devices_indices_map((global_batch,))
    wanted = set(sharding.addressable_devices) if devices is None else set(devices)
    rows: set[int] = set()
    for dev, idx in index_map.items():
        if dev in wanted:
            rows.update(range(global_batch)[idx[0]])
    return sorted(rows)


def process_lanes(sharding: jax.sharding.Sharding, global_batch: int, process_index: int | None = None) -> list[int]:
    """The lanes process `process_index` (default: this one) must load, in the row order
    `jax.make_array_from_process_local_data` expects (ascending global row)."""
    if process_index is None:
        return device_rows(sharding, global_batch)
    devs = [d for d in sharding.device_set if d.process_index == process_index]
    return device_rows(sharding, global_batch, devs)


def lane_assignment(sharding: jax.sharding.Sharding, global_batch: int) -> dict[str, list[int]]:
    """Process index -> its lanes, for the checkpoint's data state (what layout saved it)."""
    procs = sorted({d.process_index for d in sharding.device_set})
    return {str(p): process_lanes(sharding, global_batch, p) for p in procs}


def check_partition(assignment: dict[str, list[int]], global_batch: int) -> None:
    """Every lane is fed by at least one process, and no process names a row outside the batch.
    (Processes that share rows, when the batch is replicated across them along `tensor`, load
    the same lanes: a lane's data depends only on the lane and the step.)"""
    rows = [int(b) for v in assignment.values() for b in v]
    bad = [b for b in rows if not 0 <= b < global_batch]
    if bad:
        raise LaneAssignmentError(f"lane assignment: row {bad[0]} is outside the global batch [0, {global_batch})")
    missing = sorted(set(range(global_batch)) - set(rows))
    if missing:
        raise LaneAssignmentError(f"lane assignment: lanes {missing[:8]} of {global_batch} are fed by no process")


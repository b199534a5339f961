"""Lanes follow the mesh: on an interleaved device order (as TPU meshes are), each host's lanes are
the rows its devices hold, and a lane's documents do not depend on which host reads it."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bst_dist import parallel
from data_pipelines import lanes as lanes_lib


def _interleaved_mesh():
    devs = jax.devices()[:8]
    # Hosts own devices (0,1), (2,3), ...; the mesh interleaves them along data.
    order = [devs[i] for i in (0, 2, 4, 6, 1, 3, 5, 7)]
    return Mesh(np.array(order).reshape(8, 1, 1), parallel.AXES), devs


def test_host_rows_are_the_rows_its_devices_hold():
    mesh, devs = _interleaved_mesh()
    B = 16
    sh = NamedSharding(mesh, P(("data", "fsdp")))
    arr = jax.device_put(np.arange(B), sh)
    held = {}
    for shard in arr.addressable_shards:
        held[shard.device] = np.asarray(shard.data).tolist()
    seen = []
    for h in range(4):
        host = devs[2 * h:2 * h + 2]
        rows = parallel.device_rows(sh, B, host)
        assert rows == sorted(held[host[0]] + held[host[1]])
        assert rows != list(range(4 * h, 4 * h + 4)) or h == 0  # not the contiguous split
        seen += rows
    assert sorted(seen) == list(range(B))
    parallel.check_partition({"0": parallel.process_lanes(sh, B)}, B)


def test_a_lane_reads_the_same_documents_on_any_host():
    nseq = np.random.default_rng(0).integers(1, 5, size=40)
    sched = lanes_lib.LaneSchedule(nseq, 16, seed=3, salt=1)
    full = lanes_lib.LaneCursor(sched, 0, 16, None)
    sub_lanes = [1, 9, 0, 8]
    part = lanes_lib.LaneCursor(sched, 0, 0, None, lanes=sub_lanes)
    for _ in range(12):
        assert [part.current(i) for i in range(4)] == [full.current(b) for b in sub_lanes]
        full.advance(1)
        part.advance(1)
    # Restoring the positions of those lanes onto another subset order keeps each lane's stream.
    pos = full.positions()
    again = lanes_lib.LaneCursor(sched, 0, 0, None, [pos[b] for b in (8, 1)], full.step, lanes=[8, 1])
    assert [again.current(i) for i in range(2)] == [full.current(8), full.current(1)]


def test_device_order_knob_places_devices_and_refuses_bad_orders():
    import pytest

    from bst_dist.config import ConfigError, MeshConfig

    devs = jax.devices()[:8]
    perm = (3, 1, 7, 5, 0, 2, 4, 6)
    mesh = parallel.make_mesh(MeshConfig(data=-1, device_order=perm), devs)
    assert [d.id for d in mesh.devices.reshape(-1)] == [devs[i].id for i in perm]
    sh = NamedSharding(mesh, P(("data", "fsdp")))
    assert parallel.device_rows(sh, 16, [devs[3]]) == [0, 1]  # position 0 holds device 3: rows 0-1
    one_process = parallel.make_mesh(MeshConfig(data=-1, device_order="interleaved"), devs)
    assert list(one_process.devices.reshape(-1)) == sorted(devs, key=lambda d: d.id)
    for bad, says in (("zigzag", "'zigzag' is not allowed"), ((0, 1, 2), "not a permutation of 0..7")):
        with pytest.raises(ConfigError, match=f"mesh.device_order: .*{says}"):
            parallel.make_mesh(MeshConfig(data=-1, device_order=bad), devs)


def test_check_partition_names_an_unfed_lane():
    import pytest

    parallel.check_partition({"0": [0, 2], "1": [1, 3]}, 4)
    parallel.check_partition({"0": [0, 1], "1": [0, 1], "2": [2, 3]}, 4)  # shared rows are allowed
    with pytest.raises(parallel.LaneAssignmentError, match=r"lanes \[3\] of 4 are fed by no process"):
        parallel.check_partition({"0": [0, 2], "1": [1]}, 4)

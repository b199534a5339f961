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


class FakeDevice:
    """Enough of a jax Device for mesh construction: 4 hosts of 4 chips per slice."""

    platform, device_kind = "cpu", "fake"

    def __init__(self, i, per_slice):
        self.id, self.slice_index, self.process_index = i, i // per_slice, i // 4

    def __repr__(self):
        return f"D{self.id}"


def test_hybrid_mesh_keeps_fsdp_and_tensor_inside_a_slice():
    from bst_dist.config import MeshConfig
    from bst_dist.parallel.mesh import device_grid

    devs = [FakeDevice(i, 16) for i in range(32)]  # 2 slices of 16
    grid = device_grid(MeshConfig(data=8, fsdp=2, tensor=2, dcn={"data": 2}), devs)
    assert grid.shape == (8, 2, 2)
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    assert (slice_of[:4] == 0).all() and (slice_of[4:] == 1).all()  # data spans the slices, in blocks
    for i in range(8):  # every fsdp x tensor group (one data index) is inside one slice
        assert len(set(slice_of[i].ravel())) == 1
    assert sorted(d.id for d in grid.ravel()) == list(range(32))


def test_dcn_bad_input_is_one_line_naming_the_key():
    import pytest

    from bst_dist.config import ConfigError, MeshConfig
    from bst_dist.parallel.mesh import device_grid
    from bst_dist.parallel.rules import rules_from_config

    two = [FakeDevice(i, 16) for i in range(32)]
    one = [FakeDevice(i, 32) for i in range(32)]
    cases = [
        (MeshConfig(data=-1, dcn={"data": 2}), one, "mesh.dcn.data: 2 slices asked for, but the 32 devices are one "
                                                    "slice; drop mesh.dcn on a single slice"),
        (MeshConfig(data=-1), two, "mesh.dcn.data: the devices span 2 slices; set mesh.dcn: {data: 2} (got 1)"),
        (MeshConfig(data=8, fsdp=4, dcn={"fsdp": 2}), two, "mesh.dcn.fsdp: only data may span slices"),
        (MeshConfig(data=-1, dcn={"dta": 2}), two, "mesh.dcn.dta: unknown mesh axis; allowed: data"),
    ]
    for mesh_cfg, devs, message in cases:
        with pytest.raises(ConfigError) as e:
            device_grid(mesh_cfg, devs)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^mesh.rules: embed -> data would shard parameters across slices"):
        rules_from_config(MeshConfig(data=-1, dcn={"data": 2}, rules=(("embed", "data"),)))


def test_batch_and_heads_the_mesh_cannot_split_are_named():
    import pytest

    from bst_dist.config import ConfigError
    from bst_dist.parallel import check_fits
    from tests.helpers.runs import make_cfg
    from tests.helpers.tiny import job_dict

    cfg = make_cfg(job_dict(), "/nonexistent")  # batch 8, 2 heads
    check_fits(cfg, {"data": 4, "fsdp": 2, "tensor": 2})
    with pytest.raises(ConfigError, match=r"^train.global_batch_size: global_batch_size 8 is not divisible by "
                                          r"the data-parallel size \(data x fsdp = 16\)$"):
        check_fits(cfg, {"data": 16, "fsdp": 1, "tensor": 1})
    with pytest.raises(ConfigError, match=r"^mesh.tensor: 4 does not divide model.num_heads = 2$"):
        check_fits(cfg, {"data": 2, "fsdp": 1, "tensor": 4})


def test_tpu_num_workers_must_be_hosts_per_slice_times_slices():
    import pytest

    from bst_dist.config import ConfigError
    from tests.helpers.runs import make_cfg
    from tests.helpers.tiny import job_dict

    tpu = {"use_tpu": True, "topology": "2x4x4", "accelerator_type": "TPU-V5P"}
    make_cfg(job_dict(ray={**tpu, "num_workers": 8}), "/x")
    make_cfg(job_dict(ray={**tpu, "num_workers": 16}, mesh={"data": -1, "dcn": {"data": 2}}), "/x")
    with pytest.raises(ConfigError, match=r"^ray.num_workers: 12 must be a multiple of 8 \(hosts per slice\) for "
                                          r"topology 2x4x4$"):
        make_cfg(job_dict(ray={**tpu, "num_workers": 12}), "/x")
    with pytest.raises(ConfigError, match=r"^ray.num_workers: 8 must be 8 hosts per slice x 2 slice\(s\)"):
        make_cfg(job_dict(ray={**tpu, "num_workers": 8}, mesh={"data": -1, "dcn": {"data": 2}}), "/x")


def _libtpu_or_skip():
    import pytest

    from bst_dist.parallel.topology import libtpu_present

    if not libtpu_present():
        pytest.skip('libtpu is absent: the tpu extra (pip install "jax[tpu]==0.10.2") describes TPU topologies')


def _rows_by_position(mesh, B):
    """Process -> rows, computed from the mesh array alone: data position i holds rows
    [i*B/D, (i+1)*B/D) (fsdp = tensor = 1 here)."""
    D = mesh.devices.shape[0]
    out: dict = {}
    for i, dev in enumerate(mesh.devices[:, 0, 0]):
        out.setdefault(str(dev.process_index), []).extend(range(i * B // D, (i + 1) * B // D))
    return {k: sorted(v) for k, v in out.items()}


def test_lane_maps_of_real_v5p_topologies():
    _libtpu_or_skip()
    from bst_dist.config import MeshConfig
    from bst_dist.parallel.topology import topology_devices

    for name, hosts, B in (("v5p-32", 4, 32), ("v5p-64", 8, 64)):
        devs = topology_devices(name)
        mesh = parallel.make_mesh(MeshConfig(data=-1), devs)
        sh = NamedSharding(mesh, P(("data", "fsdp")))
        got = parallel.lane_assignment(sh, B)
        assert got == _rows_by_position(mesh, B) and len(got) == hosts
        parallel.check_partition(got, B)
        assert all(len(v) == B // hosts for v in got.values())
        contiguous = {str(p): list(range(p * B // hosts, (p + 1) * B // hosts)) for p in range(hosts)}
        assert got != contiguous  # the physical order interleaves hosts along data
        if name == "v5p-32":
            assert got["0"] == [0, 1, 8, 9, 16, 17, 24, 25]


def test_hybrid_mesh_of_two_real_v5p_64_slices():
    _libtpu_or_skip()
    from bst_dist.config import MeshConfig
    from bst_dist.parallel.topology import topology_devices

    devs = topology_devices("v5p-64", slices=2)
    mesh = parallel.make_mesh(MeshConfig(data=-1, fsdp=4, dcn={"data": 2}), devs)
    assert dict(mesh.shape) == {"data": 16, "fsdp": 4, "tensor": 1}
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slice_of[:8] == 0).all() and (slice_of[8:] == 1).all()
    got = parallel.lane_assignment(NamedSharding(mesh, P(("data", "fsdp"))), 128)
    assert len(got) == 16
    parallel.check_partition(got, 128)

"""The device mesh: (data, fsdp, tensor) over the devices present, in the order `mesh.device_order`
asks for.

`default` is jax.make_mesh's order (physical on TPU: one host's chips spread along `data`);
`interleaved` deals the mesh positions to processes in turn (position i on process i mod P), the
CPU stand-in for TPU's order, so that the lane-follows-mesh path runs in tests; a list is an
explicit permutation of jax.devices() (position i holds jax.devices()[order[i]]).

Devices on several TPU slices make a hybrid mesh: `mesh.dcn: {data: S}` splits `data` (a total
size, like fsdp and tensor) into S slices joined by the data-centre network, and everything else
stays inside a slice (device_grid).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from bst_dist.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")
DEVICE_ORDERS = ("default", "interleaved")


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh: fsdp x tensor = {known} does not divide the {num_devices} devices present")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh: data x fsdp x tensor = {'x'.join(map(str, sizes))} = {math.prod(sizes)} "
                          f"does not match the {num_devices} devices present; use -1 on one axis to fill")
    return tuple(sizes)


def interleaved(devices: list) -> list:
    """Processes take turns: [p0's 1st, p1's 1st, ..., p0's 2nd, ...] (each process's devices in
    id order)."""
    by_proc: dict[int, list] = {}
    for d in sorted(devices, key=lambda d: d.id):
        by_proc.setdefault(d.process_index, []).append(d)
    groups = [by_proc[p] for p in sorted(by_proc)]
    if len({len(g) for g in groups}) != 1:
        raise ConfigError("mesh.device_order: interleaved needs the same number of devices on every process")
    return [g[i] for i in range(len(groups[0])) for g in groups]


def ordered_devices(order, devices: list) -> list | None:
    """The devices in mesh order for `mesh.device_order` (None: leave it to jax.make_mesh)."""
    if isinstance(order, str):
        if order not in DEVICE_ORDERS:
            raise ConfigError(f"mesh.device_order: {order!r} is not allowed; allowed: {', '.join(DEVICE_ORDERS)} "
                              "or a permutation of the device indices")
        return None if order == "default" else interleaved(devices)
    perm = [int(i) for i in order]
    if sorted(perm) != list(range(len(devices))):
        raise ConfigError(f"mesh.device_order: {list(perm)[:8]}{'...' if len(perm) > 8 else ''} is not a permutation "
                          f"of 0..{len(devices) - 1} (the {len(devices)} devices present)")
    return [devices[i] for i in perm]


def num_slices(devices: list) -> int:
    """Slices the devices span (TPU devices carry slice_index; others are one slice)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def dcn_shape(mesh_cfg: MeshConfig, shape: tuple[int, int, int], slices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) slice counts from `mesh.dcn`, checked against the devices' slices.
    Only `data` may span slices: FSDP all-gathers and tensor-parallel reductions run every layer
    and need ICI bandwidth; data parallelism reduces gradients once per step."""
    from bst_dist.config.validate import dcn_slices

    d = dcn_slices(dict(getattr(mesh_cfg, "dcn", {}) or {}))
    if d > 1 and slices == 1:
        raise ConfigError(f"mesh.dcn.data: {d} slices asked for, but the {math.prod(shape)} devices are one slice; "
                          "drop mesh.dcn on a single slice")
    if d != slices:
        raise ConfigError(f"mesh.dcn.data: the devices span {slices} slices; set mesh.dcn: {{data: {slices}}} "
                          f"(got {d})")
    if shape[0] % d:
        raise ConfigError(f"mesh.dcn.data: {d} slices do not divide mesh.data = {shape[0]}")
    return (d, 1, 1)


def device_grid(mesh_cfg: MeshConfig, devices: list) -> np.ndarray | None:
    """The (data, fsdp, tensor) array of devices, or None to let jax.make_mesh order one slice.
    Across slices: a hybrid mesh, each slice an ICI mesh of data/S x fsdp x tensor, the slices
    stacked along data, so fsdp and tensor groups never leave a slice."""
    shape = mesh_shape(mesh_cfg, len(devices))
    slices = num_slices(devices)
    dcn = dcn_shape(mesh_cfg, shape, slices)
    order = getattr(mesh_cfg, "device_order", "default")
    if slices > 1:
        if order != "default":
            raise ConfigError("mesh.device_order: only default on several slices (the hybrid mesh orders them)")
        from jax.experimental import mesh_utils

        ici = tuple(s // d for s, d in zip(shape, dcn))
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    ordered = ordered_devices(order, list(devices))
    if ordered is None:
        return None
    return np.array(ordered, dtype=object).reshape(shape)  # as given: jax.make_mesh would reorder it


def make_mesh(mesh_cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    axis_types = (AxisType.Auto,) * 3
    grid = device_grid(mesh_cfg, list(devices))
    if grid is not None:
        return Mesh(grid, AXES, axis_types=axis_types)
    # Auto axes: classic sharding propagation (jax.make_mesh defaults to Explicit). Shapes are
    # positional: the keyword changed name between jax 0.10 and 0.11.
    return jax.make_mesh(mesh_shape(mesh_cfg, len(devices)), AXES, axis_types, devices=devices)

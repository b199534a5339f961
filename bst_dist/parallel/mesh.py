"""The device mesh: (data, fsdp, tensor) over the devices present."""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh

from bst_dist.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")


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


def make_mesh(mesh_cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: classic sharding propagation (jax.make_mesh defaults to Explicit). Shapes are
    # positional: the keyword changed name between jax 0.10 and 0.11.
    return jax.make_mesh(shape, AXES, (AxisType.Auto,) * 3, devices=devices)

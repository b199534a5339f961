"""The one place that turns logical axis names into shardings (MaxText's idea).

Parameters carry logical names in their `axes` metadata ("vocab", "embed", "heads", "kv",
"mlp", "norm", None); activations, the batch and the cache use "batch". `mesh.rules` in the job
spec overrides the defaults. A mesh axis that does not divide a dimension is dropped for that
dimension (replicated) rather than failing: e.g. 8 heads on a tensor axis of 16.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bst_dist.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "kv": None,
    "norm": None,
}


def rules_from_config(mesh_cfg: MeshConfig) -> dict[str, Any]:
    rules = dict(DEFAULT_RULES)
    for name, target in mesh_cfg.rules:
        if target is not None and target not in AXES:
            raise ConfigError(f"mesh.rules: {name} -> {target!r}; allowed mesh axes: {', '.join(AXES)} or null")
        rules[name] = target
    return rules


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


def spec_for(axes: tuple, shape: tuple[int, ...], mesh: Mesh, rules: dict[str, Any]) -> P:
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used and mesh.shape[t] > 1)
        size = math.prod(mesh.shape[t] for t in targets)
        if not targets or dim % size:
            out.append(None)
            continue
        used.update(targets)
        out.append(targets[0] if len(targets) == 1 else targets)
    return P(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules: dict[str, Any]) -> nnx.State:
    """NamedShardings for an nnx.State of Variables (abstract or concrete) from their `axes`."""

    def one(v):
        axes = v.get_metadata().get("axes") or (None,) * len(v.shape)
        return v.replace(NamedSharding(mesh, spec_for(tuple(axes), tuple(v.shape), mesh, rules)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, rules: dict[str, Any] | None = None) -> NamedSharding:
    """Leading axis over the batch mesh axes, the rest replicated."""
    rules = DEFAULT_RULES if rules is None else rules
    target = rules["batch"]
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    return NamedSharding(mesh, P(targets if targets else None, *([None] * (ndim - 1))))


def cache_shardings(cache_shape: Any, mesh: Mesh, rules: dict[str, Any] | None = None) -> Any:
    """The cache is sharded along its batch axis, like the batch."""
    return jax.tree.map(lambda s: batch_sharding(mesh, len(s.shape), rules), cache_shape)


def batch_axis_size(mesh: Mesh, rules: dict[str, Any] | None = None) -> int:
    rules = DEFAULT_RULES if rules is None else rules
    target = rules["batch"]
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    return int(np.prod([mesh.shape[t] for t in targets])) if targets else 1


def create_sharded(factory, mesh: Mesh, rules: dict[str, Any]):
    """Build an NNX module directly into its shardings: shapes from `nnx.eval_shape`, then one
    jitted init with out_shardings, so no device ever holds the whole model."""
    abstract = nnx.eval_shape(factory)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh, rules)
    state = jax.jit(lambda: nnx.split(factory())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)

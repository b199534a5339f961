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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bst_dist.config import ConfigError, MeshConfig
from bst_dist.parallel.mesh import AXES

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
    if (getattr(mesh_cfg, "dcn", None) or {}).get("data", 1) > 1:
        # across slices `data` is the data-centre network: parameters stay inside a slice (an
        # all-gather per layer over DCN would dominate the step), the batch spans the slices
        for name, target in rules.items():
            targets = (target,) if isinstance(target, str) else tuple(target or ())
            if name != "batch" and "data" in targets:
                raise ConfigError(f"mesh.rules: {name} -> data would shard parameters across slices (mesh.dcn); "
                                  "keep parameters on fsdp or tensor")
            if name == "batch" and "data" not in targets:
                raise ConfigError("mesh.rules: batch must include data when mesh.dcn.data > 1 (the slices split "
                                  "the batch)")
    return rules


def check_fits(cfg, sizes: dict[str, int], process_count: int = 1) -> None:
    """Refuse, before any compilation, a job whose batch or heads the mesh cannot split; one line
    naming the key. `sizes`: mesh axis -> size (a Mesh's .shape, or a planned one)."""
    rules = rules_from_config(cfg.mesh)
    B, A = cfg.train.global_batch_size, cfg.train.grad_accum
    batch = rules["batch"]
    targets = (batch,) if isinstance(batch, str) else tuple(batch or ())
    n = math.prod(sizes[t] for t in targets)
    if B % process_count:
        raise ConfigError(f"train.global_batch_size: {B} is not divisible by the {process_count} processes "
                          "(each feeds its devices' rows)")
    if (B // A) % n:
        what = f"global_batch_size / grad_accum = {B // A}" if A > 1 else f"global_batch_size {B}"
        raise ConfigError(f"train.global_batch_size: {what} is not divisible by the data-parallel size "
                          f"({' x '.join(targets)} = {n})")
    heads = rules["heads"]
    h_targets = (heads,) if isinstance(heads, str) else tuple(heads or ())
    t = math.prod(sizes[a] for a in h_targets)
    if t > 1 and cfg.model.num_heads % t:
        raise ConfigError(f"mesh.tensor: {t} does not divide model.num_heads = {cfg.model.num_heads}")


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

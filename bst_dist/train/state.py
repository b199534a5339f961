"""The train state: parameters (float32 master weights), optimizer state and step, created
directly into their shardings on the mesh; and the cache beside it, sharded like the batch.

The state is a plain dict pytree {"params": nnx.State, "opt_state": optax state, "step": int32}
so that jit, donation and Orbax see one tree; the model's graph definition stays outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from bst_dist import parallel
from bst_dist.config import JobConfig
from bst_dist.models import build, cache_shape
from bst_dist.train.optim import make_optimizer


@dataclass
class Setup:
    """Everything built once per run from the job spec and the mesh."""

    cfg: JobConfig
    mesh: Mesh
    rules: dict
    graphdef: Any
    tx: optax.GradientTransformation
    state_shardings: Any
    cache_shardings: Any

    def abstract_state(self, state: Any) -> Any:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                            self.state_shardings)

    def abstract_cache(self) -> Any:
        shapes = cache_shape(self.cfg.model, self.cfg.train.global_batch_size)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                            self.cache_shardings)


def plan(cfg: JobConfig, mesh: Mesh) -> tuple[Setup, dict, Any]:
    """(setup, abstract state with shardings, model factory): everything but the allocation.
    Used to create the state, to restore into it, and by ops/plan_memory to compile ahead of time."""
    rules = parallel.rules_from_config(cfg.mesh)
    tx = make_optimizer(cfg.train.optimizer, cfg.train.steps)

    def factory():
        return build(cfg.model, nnx.Rngs(cfg.train.seed), remat=cfg.train.remat)

    graphdef, abs_params = nnx.split(nnx.eval_shape(factory))
    param_sh = parallel.state_shardings(abs_params, mesh, rules)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    # optimizer leaves shaped like a parameter take its sharding (AdamW mu/nu); the rest
    # (Adafactor's factored rows/columns, counts) are small and replicated.
    by_shape: dict = {}
    for p, s in zip(jax.tree.leaves(abs_params), jax.tree.leaves(param_sh)):
        by_shape.setdefault((p.shape, p.dtype), s)
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_sh = jax.tree.map(lambda x: by_shape.get((x.shape, x.dtype), replicated) if x.ndim else replicated,
                          abs_opt)
    state_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated}
    shapes = cache_shape(cfg.model, cfg.train.global_batch_size)
    cache_sh = parallel.cache_shardings(shapes, mesh, rules)
    setup = Setup(cfg, mesh, rules, graphdef, tx, state_sh, cache_sh)
    abs_state = setup.abstract_state({"params": abs_params, "opt_state": abs_opt,
                                      "step": jax.ShapeDtypeStruct((), jnp.int32)})
    return setup, abs_state, factory


def create(cfg: JobConfig, mesh: Mesh) -> tuple[Setup, dict, Any]:
    """(setup, state, cache): a fresh sharded state and an all-invalid cache."""
    setup, _, factory = plan(cfg, mesh)
    tx = setup.tx

    def init():
        params = nnx.split(factory())[1]
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    state = jax.jit(init, out_shardings=setup.state_shardings)()
    shapes = cache_shape(cfg.model, cfg.train.global_batch_size)
    cache = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                    out_shardings=setup.cache_shardings)()
    return setup, state, cache

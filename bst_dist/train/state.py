"""The train state: parameters (float32 master weights), optimizer state and step, created
directly into their shardings on the mesh; and the cache beside it, sharded like the batch.

The state is a plain dict pytree {"params": nnx.State, "opt_state": optax state, "step": int32}
so that jit, donation and Orbax see one tree; the model's graph definition stays outside.
`initial_state` is the one way a run gets its state: created, or restored from a checkpoint
straight into the shardings; with `optimizer=False` (evaluation, generation) only the
parameters, and no optimizer is built.
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
from bst_dist.errors import UserError
from bst_dist.models import Cache, build, cache_shape
from bst_dist.train.optim import make_optimizer


class NoCheckpoint(UserError, FileNotFoundError):
    """Parameters were asked for (evaluation, generation) but the run has no checkpoint."""


@dataclass
class Setup:
    """Everything built once per run from the job spec and the mesh."""

    cfg: JobConfig
    mesh: Mesh
    rules: dict
    graphdef: Any
    tx: optax.GradientTransformation | None
    state_shardings: Any
    cache_shardings: Any

    def abstract_state(self, state: Any) -> Any:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                            self.state_shardings)

    def abstract_cache(self) -> Any:
        shapes = cache_shape(self.cfg.model, self.cfg.train.global_batch_size)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                            self.cache_shardings)


def plan(cfg: JobConfig, mesh: Mesh, *, optimizer: bool = True) -> tuple[Setup, dict, Any]:
    """(setup, abstract state with shardings, model factory): everything but the allocation.
    Used to create the state, to restore into it, and by ops/plan_memory to compile ahead of time.
    optimizer=False: the state is {"params"} alone."""
    rules = parallel.rules_from_config(cfg.mesh)
    tx = make_optimizer(cfg.train.optimizer, cfg.train.steps) if optimizer else None

    def factory():
        return build(cfg.model, nnx.Rngs(cfg.train.seed), remat=cfg.train.remat)

    graphdef, abs_params = nnx.split(nnx.eval_shape(factory))
    param_sh = parallel.state_shardings(abs_params, mesh, rules)
    shapes = cache_shape(cfg.model, cfg.train.global_batch_size)
    cache_sh = parallel.cache_shardings(shapes, mesh, rules)
    if tx is None:
        setup = Setup(cfg, mesh, rules, graphdef, None, {"params": param_sh}, cache_sh)
        return setup, setup.abstract_state({"params": abs_params}), factory
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
    setup = Setup(cfg, mesh, rules, graphdef, tx, state_sh, cache_sh)
    abs_state = setup.abstract_state({"params": abs_params, "opt_state": abs_opt,
                                      "step": jax.ShapeDtypeStruct((), jnp.int32)})
    return setup, abs_state, factory


def create(cfg: JobConfig, mesh: Mesh) -> tuple[Setup, dict, Any]:
    """(setup, state, cache): a fresh sharded state and an all-invalid cache. With
    `train.init_from` the parameters are another run's (or an export's) and the optimizer
    state is fresh, so a fine-tune starts at step 0 with its own schedule."""
    setup, abstract, factory = plan(cfg, mesh)
    tx = setup.tx
    if cfg.train.init_from:
        from bst_dist.generate.params import load_init_params

        params = load_init_params(cfg.train.init_from, cfg.model, abstract["params"])
        opt_state = jax.jit(tx.init, out_shardings=setup.state_shardings["opt_state"])(params)
        state = {"params": params, "opt_state": opt_state,
                 "step": jax.device_put(jnp.zeros((), jnp.int32), setup.state_shardings["step"])}
    else:
        def init():
            params = nnx.split(factory())[1]
            return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

        state = jax.jit(init, out_shardings=setup.state_shardings)()
    cache = Cache.zeros(cfg.model, cfg.train.global_batch_size, sharding=setup.cache_shardings)
    return setup, state, cache


@dataclass
class Start:
    """Where a run starts: its setup, state and cache, the checkpoint's meta ({} when fresh) and
    the step (0 when fresh)."""

    setup: Setup
    state: Any
    cache: Any
    meta: dict
    step: int


def initial_state(cfg: JobConfig, mesh: Mesh, ckpt=None, *, data_iter=None, optimizer: bool = True,
                  step: int | None = None) -> Start:
    """Create the state, or restore it from `ckpt`'s newest readable step (or `step`) when there is
    one, straight into the shardings: no parameter init is compiled or run before a restore (on
    a GPU compiling the init of a 200M BST takes minutes). With a `data_iter` the loader is
    repositioned with the state. optimizer=False restores the parameters alone (cache None)."""
    if ckpt is None or (step is None and ckpt.latest_step() is None):
        if not optimizer:
            raise NoCheckpoint(f"{getattr(ckpt, 'directory', 'no checkpoint directory')}: no checkpoint to "
                               "restore parameters from; train the job first")
        setup, state, cache = create(cfg, mesh)
        return Start(setup, state, cache, {}, 0)
    from bst_dist import config as config_lib

    setup, abstract, _ = plan(cfg, mesh, optimizer=optimizer)
    if optimizer:
        state, cache, meta, s = ckpt.restore(abstract_state=abstract, abstract_cache=setup.abstract_cache(),
                                             data_iter=data_iter, step=step, job_config=config_lib.to_dict(cfg))
    else:
        state, meta, s = ckpt.restore_state(abstract_state=abstract, step=step)
        cache = None
    return Start(setup, state, cache, meta, s)

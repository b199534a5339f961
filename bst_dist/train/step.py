"""train_step(state, cache, batch) -> (state, cache, metrics), jitted once with explicit
shardings and donation.

* Loss: mean next-token cross-entropy over `loss_mask` (nats/token) of the global batch, from
  `LM.loss` (the chunked head of models/loss.py). The batch arrives as a dict placed by
  `batch_shardings` and is read as a typed `Batch` (train/batch.py).
* Gradient accumulation splits the lanes, never the sequence: micro-batch j takes lanes
  j, j+A, j+2A, ... so every data shard contributes to every micro-batch and each lane's
  sequences still reach the cache in order, one per step.
* Dropout keys are fold_in(seed, step, lane): independent of the mesh and the process count.
* A non-finite loss or gradient leaves parameters and optimizer state unchanged; the batch is
  consumed, the cache advances and the step is counted (metrics["skipped"] = 1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bst_dist.models.modules import Dropout
from bst_dist.parallel import batch_sharding
from bst_dist.train.batch import FIELDS, Batch
from bst_dist.train.state import Setup


def _lanes_to_micro(x: jax.Array, A: int) -> jax.Array:
    """(B, ...) -> (A, B/A, ...): micro j holds lanes j, j+A, ..."""
    return jnp.swapaxes(x.reshape(x.shape[0] // A, A, *x.shape[1:]), 0, 1)


def _micro_to_lanes(x: jax.Array) -> jax.Array:
    A, b = x.shape[:2]
    return jnp.swapaxes(x, 0, 1).reshape(A * b, *x.shape[2:])


def make_train_step(setup: Setup):
    cfg = setup.cfg
    graphdef, tx = setup.graphdef, setup.tx
    A = cfg.train.grad_accum
    m = cfg.model
    carry_cache = cfg.train.carry_cache
    use_dropout = m.dropout > 0 or m.attn_dropout > 0
    base_key = jax.random.key(cfg.train.seed)

    def micro_loss(params, cache, batch: Batch, keys):
        model = nnx.merge(graphdef, params)
        drop = Dropout(keys, m.dropout, m.attn_dropout) if use_dropout else None
        doc_start = batch.doc_start if carry_cache else jnp.ones_like(batch.doc_start)
        # the head runs in chunks: the (B, T, V) float32 logits are never materialised
        nats, _, new_cache = model.loss(batch.inputs, batch.targets, batch.loss_mask, cache, doc_start, drop)
        return nats, new_cache

    def train_step(state, cache, batch):
        params, step = state["params"], state["step"]
        batch = Batch.of(batch)
        B = batch.inputs.shape[0]
        step_key = jax.random.fold_in(base_key, step)
        keys = jax.vmap(lambda lane: jax.random.fold_in(step_key, lane))(jnp.arange(B))
        tokens = jnp.maximum(jnp.sum(batch.loss_mask), 1.0)
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if A == 1:
            (nats, new_cache), grads = grad_fn(params, cache, batch, keys)
        else:
            micro = jax.tree.map(lambda x: _lanes_to_micro(x, A), (cache, batch, keys))

            def body(acc, xs):
                c, b, k = xs
                (n, c_new), g = grad_fn(params, c, b, k)
                return jax.tree.map(jnp.add, acc, (n, g)), c_new

            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (nats, grads), caches = jax.lax.scan(body, zero, micro)
            new_cache = jax.tree.map(_micro_to_lanes, caches)
        grads = jax.tree.map(lambda g: g / tokens, grads)
        loss = nats / tokens
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        new_state = {"params": keep(new_params, params), "opt_state": keep(new_opt, state["opt_state"]),
                     "step": step + 1}
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": tokens, "skipped": (~ok).astype(jnp.int32)}
        return new_state, new_cache, metrics

    return jax.jit(train_step,
                   in_shardings=(setup.state_shardings, setup.cache_shardings, batch_shardings(setup)),
                   out_shardings=(setup.state_shardings, setup.cache_shardings, None),
                   donate_argnums=(0, 1))


def batch_shardings(setup: Setup) -> dict[str, Any]:
    """Batch fields are sharded along lanes like the cache (a dict: what the loop's batches are)."""
    return {k: batch_sharding(setup.mesh, Batch.ndim(k), setup.rules) for k in FIELDS}

"""Optimizers and learning-rate schedules (docs/models.md).

Two recipes:

* `adamw`: global-norm clipping (`clip_norm`, 0 disables), then AdamW with `b1, b2, eps,
  weight_decay`, the decay masked by `decay_mask`. Schedule: linear warmup from 0 to `lr` over
  `warmup_steps`, then cosine decay to `lr * min_lr_ratio` at `total_steps` (or rsqrt, or
  constant). This is the BST paper's LRA recipe; its LM recipe is not published.
* `adafactor`: BRecT's meliad recipe, `optax.adafactor(multiply_by_parameter_scale=True,
  momentum=0.9, decay_rate=0.8, clipping_threshold=1.0)`, see `make_schedule` for its schedule.
  No global-norm clipping and no weight decay (meliad uses neither: Adafactor clips its own
  update RMS at 1.0), so `clip_norm` and `weight_decay` are ignored for it.

The loop uses these with optax directly on the pure parameter State:
`params = nnx.state(model, nnx.Param); opt_state = tx.init(params);
updates, opt_state = tx.update(grads, opt_state, params)`. Pass `params` to `update`: both
weight decay and Adafactor's parameter-scale need them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bst_dist.config import OptimizerConfig

# The naming contract with the model (bst_dist/models): S4D's A and dt, and B, are named so
# under a module whose path contains "ssm". Decaying them towards 0 would change the filters'
# time scales (log_dt, log_A_re) rather than regularise, which is why S4 excludes them.
SSM_NO_DECAY = frozenset({"log_dt", "log_A_re", "A_im", "B"})


def make_schedule(opt_cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the step (0-based count of updates already applied).

    Both optimizers use `lr(step) = ramp(step) * decay(max(step, warmup))` with
    `ramp = min(step, warmup) / warmup`: 0 at step 0, `lr` at the end of warmup.

    * adamw, cosine: the cosine runs from the end of warmup to `total_steps`, from `lr` to
      `lr * min_lr_ratio`; so "warmup, then cosine" (the usual LM recipe).
    * adafactor, cosine: meliad's `Trainer.learning_rate_schedule_fn` with
      `lr_cosine_decay(max_lr=lr, min_lr=lr*min_lr_ratio)` and base lr 1.0: the cosine clock starts
      at step 0 over `total_steps` and is held at `warmup` during the warmup ramp. With
      `lr=0.01, min_lr_ratio=0.1, warmup_steps=1000` this is BRecT's schedule exactly, up to
      `total_steps` (meliad then halves the floor every `total_steps`; we stop there and hold).
    * rsqrt: adamw uses `lr * sqrt(warmup / step)` floored at `lr * min_lr_ratio` (Transformer);
      adafactor uses meliad's `lr_rsqrt_decay`: `min(lr, lr*min_lr_ratio / sqrt(step / total))`,
      which reaches the floor at `total_steps`.
    * constant: `lr` after warmup.
    """
    peak = float(opt_cfg.lr)
    floor = peak * float(opt_cfg.min_lr_ratio)
    warm = int(opt_cfg.warmup_steps)
    total = max(int(total_steps), 1)
    meliad = opt_cfg.name == "adafactor"
    kind = opt_cfg.schedule

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        ramp = jnp.minimum(step, warm) / warm if warm > 0 else jnp.float32(1.0)
        s = jnp.maximum(step, warm)
        if kind == "constant":
            decay = jnp.full_like(s, peak)
        elif kind == "cosine":
            start = 0 if meliad else warm
            t = jnp.clip((s - start) / max(total - start, 1), 0.0, 1.0)
            decay = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * t))
        elif kind == "rsqrt":
            s = jnp.maximum(s, 1.0)
            if meliad:
                decay = jnp.minimum(peak, floor / jnp.sqrt(s / total))
            else:
                decay = jnp.maximum(floor, peak * jnp.sqrt(max(warm, 1) / s))
        else:  # config validation allows only the three above
            raise ValueError(f"train.optimizer.schedule: unknown schedule {kind!r}")
        return ramp * decay

    return schedule


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _decays(path: tuple, leaf: Any) -> bool:
    names = [_key_name(k) for k in path]
    # nnx.Variable is itself a pytree node whose child is reached through `.value`.
    while names and names[-1] in ("value", "raw_value"):
        names.pop()
    name = names[-1] if names else ""
    if getattr(leaf, "ndim", 0) < 2:
        return False  # vectors: norm scales, biases, S4D D, log_dt
    if name == "scale" or name.endswith("bias"):
        return False
    if name in SSM_NO_DECAY and any("ssm" in n.lower() for n in names[:-1]):
        return False
    return True


def decay_mask(params: Any) -> Any:
    """A pytree of bools shaped like `params`: True where weight decay applies.

    Decided by the parameter's path (keys of `jax.tree_util.tree_flatten_with_path`, which for
    an nnx.State of nnx.Param ends in the Variable's `value`) and its rank: matrices decay,
    except SSM `log_dt`, `log_A_re`, `A_im`, `B` under a module path containing "ssm", norm
    `scale`s and anything named `*bias`. Vectors (ndim < 2) never decay.
    """
    return jax.tree_util.tree_map_with_path(_decays, params)


def make_optimizer(opt_cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimizer of a job (see the module docstring for the two recipes)."""
    schedule = make_schedule(opt_cfg, total_steps)
    if opt_cfg.name == "adafactor":
        return optax.adafactor(
            learning_rate=schedule,
            multiply_by_parameter_scale=True,
            momentum=0.9,
            decay_rate=0.8,
            clipping_threshold=1.0,
        )
    if opt_cfg.name != "adamw":
        raise ValueError(f"train.optimizer.name: unknown optimizer {opt_cfg.name!r}")
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=opt_cfg.b1,
        b2=opt_cfg.b2,
        eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay,
        mask=decay_mask,
    )
    if opt_cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt_cfg.clip_norm), adamw)
    return adamw

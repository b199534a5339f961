"""Optimizers: schedule values, the weight-decay mask on an nnx State, one real update each."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bst_dist.config import OptimizerConfig
from bst_dist.train.optim import decay_mask, make_optimizer, make_schedule


class _S4D(nnx.Module):
    def __init__(self, d: int, n: int):
        self.log_dt = nnx.Param(jnp.full((d,), -3.0))
        self.log_A_re = nnx.Param(jnp.full((d, n), -0.7))
        self.A_im = nnx.Param(jnp.ones((d, n)))
        self.B = nnx.Param(jnp.ones((d, n)))
        self.C = nnx.Param(jnp.ones((d, n)))


class _Layer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.ssm = _S4D(8, 4)
        self.mlp = nnx.Linear(8, 8, rngs=rngs)


class _Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(16, 8, rngs=rngs)
        self.layers = nnx.List([_Layer(rngs), _Layer(rngs)])
        # A non-SSM parameter that happens to be called B must still decay.
        self.B = nnx.Param(jnp.ones((8, 8)))


def _flat(tree):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        out["/".join(k for k in keys if k != "value")] = leaf
    return out


def test_cosine_schedule_warmup_peak_end():
    cfg = OptimizerConfig(name="adamw", lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    s = make_schedule(cfg, total_steps=110)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 0.5e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)  # peak right after warmup
    np.testing.assert_allclose(float(s(60)), 0.55e-3, rtol=1e-5)  # cosine midpoint
    np.testing.assert_allclose(float(s(110)), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(float(s(500)), 1e-4, rtol=1e-5)  # held at the floor


def test_adafactor_schedule_is_meliads():
    cfg = OptimizerConfig(name="adafactor", lr=0.01, min_lr_ratio=0.1, warmup_steps=1000, schedule="cosine")
    total = 250_000
    s = make_schedule(cfg, total)

    def meliad(step):  # Trainer.learning_rate_schedule_fn with lr_cosine_decay, base lr 1.0
        ramp = min(step, 1000) / 1000
        t = min(max(step, 1000), total) / total
        return ramp * (0.001 + (1 + math.cos(math.pi * t)) * 0.5 * (0.01 - 0.001))

    for step in (0, 1, 500, 1000, 1001, 125_000, 249_999, 250_000):
        np.testing.assert_allclose(float(s(step)), meliad(step), rtol=1e-5, atol=1e-12)


def test_rsqrt_and_constant_schedules():
    cfg = OptimizerConfig(name="adamw", lr=1e-3, min_lr_ratio=0.01, warmup_steps=100, schedule="rsqrt")
    s = make_schedule(cfg, 10_000)
    np.testing.assert_allclose(float(s(100)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(400)), 0.5e-3, rtol=1e-6)
    c = make_schedule(dataclasses.replace(cfg, schedule="constant"), 10_000)
    np.testing.assert_allclose([float(c(50)), float(c(9_999))], [0.5e-3, 1e-3], rtol=1e-6)


def test_decay_mask_by_path_on_nnx_state():
    params = nnx.state(_Tiny(nnx.Rngs(0)), nnx.Param)
    mask = _flat(decay_mask(params))
    assert mask["embed/embedding"] and mask["layers/0/mlp/kernel"] and mask["layers/1/ssm/C"]
    assert mask["B"]  # not under an ssm module
    for name in ("log_dt", "log_A_re", "A_im", "B"):
        assert not mask[f"layers/0/ssm/{name}"], name
    assert not mask["layers/0/norm/scale"] and not mask["layers/0/norm/bias"]
    assert not mask["layers/0/mlp/bias"]


def test_adamw_decays_matrices_not_ssm_params():
    model = _Tiny(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    cfg = OptimizerConfig(name="adamw", lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=1.0,
                          schedule="constant")
    tx = make_optimizer(cfg, total_steps=10)
    opt_state = tx.init(params)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, opt_state, params)
    new = _flat(optax.apply_updates(params, updates))
    old = _flat(params)
    # With zero gradients only weight decay moves a parameter: w <- w - lr * wd * w.
    np.testing.assert_allclose(new["layers/0/mlp/kernel"], old["layers/0/mlp/kernel"] * 0.95, rtol=1e-6)
    np.testing.assert_allclose(new["layers/0/ssm/log_A_re"], old["layers/0/ssm/log_A_re"])
    np.testing.assert_allclose(new["layers/0/ssm/B"], old["layers/0/ssm/B"])
    np.testing.assert_allclose(new["layers/0/ssm/log_dt"], old["layers/0/ssm/log_dt"])


def test_adamw_clips_global_norm():
    cfg = OptimizerConfig(name="adamw", lr=1.0, warmup_steps=0, weight_decay=0.0, clip_norm=1.0,
                          b1=0.0, b2=0.0, eps=1.0, schedule="constant")
    tx = make_optimizer(cfg, total_steps=10)
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    # Global norm 200 is clipped to 1: each entry 0.5. Adam with b1=b2=0 and eps=1 then
    # steps g / (|g| + 1) = 1/3 (unclipped it would be 100/101).
    updates, _ = tx.update({"w": jnp.full((2, 2), 100.0)}, state, params)
    np.testing.assert_allclose(updates["w"], -1.0 / 3.0, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "rsqrt"])
def test_adafactor_runs_a_step(schedule):
    model = _Tiny(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    cfg = OptimizerConfig(name="adafactor", lr=0.01, warmup_steps=2, schedule=schedule)
    tx = make_optimizer(cfg, total_steps=100)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)

    @jax.jit
    def step(params, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    p1, opt_state = step(params, opt_state)  # step 0: lr 0, no move
    p2, opt_state = step(p1, opt_state)
    a, b, c = _flat(params), _flat(p1), _flat(p2)
    np.testing.assert_array_equal(a["layers/0/mlp/kernel"], b["layers/0/mlp/kernel"])
    assert not np.allclose(b["layers/0/mlp/kernel"], c["layers/0/mlp/kernel"])
    assert all(np.all(np.isfinite(v)) for v in c.values())

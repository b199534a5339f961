"""The train step's promises: gradient accumulation over strided lane groups equals one big batch;
remat changes memory, not numbers; dropout depends on (seed, step, lane) only, not on the mesh;
a non-finite loss leaves the parameters alone while the cache advances and the step counts."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from bst_dist import config, parallel
from bst_dist.train import state as state_lib
from bst_dist.train.step import _lanes_to_micro, _micro_to_lanes, batch_shardings, make_train_step

from tests.helpers.tiny import RANDOM_TOKENS, job_dict

# The tiny job on random tokens, on 8 data shards
JOB = job_dict(model=RANDOM_TOKENS, train={"steps": 10, "optimizer": {"lr": 1e-2, "warmup_steps": 0}}, mesh={"data": 8})


def cfg_with(*overrides):
    return config.from_dict(JOB, list(overrides))


def batches(n, B=8, L=32, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.integers(0, 64, size=(B, L + 1)).astype(np.int32)
        mask = np.ones((B, L), np.float32)
        mask[0, L // 2:] = 0  # a padded tail: masked targets count for nothing
        out.append({"inputs": x[:, :-1], "targets": x[:, 1:], "loss_mask": mask,
                    "doc_start": np.array([i == 0 or b % 3 == 0 for b in range(B)])})
    return out


def run_steps(cfg, data):
    mesh = parallel.make_mesh(cfg.mesh)
    setup, state, cache = state_lib.create(cfg, mesh)
    step = make_train_step(setup)
    sh = batch_shardings(setup)
    losses = []
    for b in data:
        state, cache, m = step(state, cache, {k: jax.device_put(v, sh[k]) for k, v in b.items()})
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state["params"]), jax.device_get(cache)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_lane_groups_are_strided():
    x = jnp.arange(8)
    micro = _lanes_to_micro(x, 2)
    assert micro.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]  # each group spans every data shard
    assert _micro_to_lanes(micro).tolist() == list(range(8))


@pytest.fixture(scope="module")
def ref():
    """The plain run (no accumulation, remat or dropout) the others are compared with."""
    return run_steps(cfg_with(), batches(3))


def test_grad_accumulation_equals_one_batch(ref):
    data = batches(3)
    acc = run_steps(cfg_with("train.grad_accum=2", "mesh.data=4", "mesh.tensor=2"), data)
    np.testing.assert_allclose(acc[0], ref[0], rtol=1e-5)
    assert_trees_close(acc[1], ref[1])
    assert_trees_close(acc[2], ref[2])  # each lane's cache advanced exactly as without accumulation


def test_remat_changes_nothing_numerically(ref):
    got = run_steps(cfg_with("train.remat=full"), batches(3))
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    assert_trees_close(got[1], ref[1])


def test_dropout_is_independent_of_the_mesh(ref):
    data = batches(3)
    a = run_steps(cfg_with("model.dropout=0.1", "model.attn_dropout=0.1"), data)
    b = run_steps(cfg_with("model.dropout=0.1", "model.attn_dropout=0.1", "mesh.data=2", "mesh.fsdp=2",
                           "mesh.tensor=2"), data)
    np.testing.assert_allclose(b[0], a[0], rtol=1e-5)
    assert abs(ref[0][0] - a[0][0]) > 1e-4  # dropout is really on


def test_non_finite_loss_skips_the_update_but_advances_cache_and_step():
    cfg = cfg_with()
    mesh = parallel.make_mesh(cfg.mesh)
    setup, state, cache = state_lib.create(cfg, mesh)
    step = make_train_step(setup)
    sh = batch_shardings(setup)
    params0 = jax.device_get(state["params"])
    b = batches(1)[0]
    bad = dict(b, loss_mask=np.full_like(b["loss_mask"], np.nan))  # a NaN that reaches loss and grads
    state, new_cache, m = step(state, cache, {k: jax.device_put(v, sh[k]) for k, v in bad.items()})
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    assert int(state["step"]) == 1
    assert_trees_close(jax.device_get(state["params"]), params0, rtol=0, atol=0)
    assert bool(np.all(np.asarray(new_cache["valid"])))  # the cache advanced

"""Checkpoints with real Orbax on disk and real sharded arrays on 8 fake CPU devices.

Also the SIGTERM guard, which decides when the loop takes its last checkpoint.
"""

import logging
import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from bst_dist.train.checkpoint import (
    FORMAT_VERSION,
    Checkpointer,
    IncompatibleCheckpoint,
    NoReadableCheckpoint,
    abstract_tree,
    check_compatible,
)
from bst_dist.train import integrity
from bst_dist.train.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, PreemptionGuard, any_process

AXES = ("data", "fsdp", "tensor")


def _mesh(shape):
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3)


def _spec_8(x):  # on (8,1,1): rows over data
    return P("data") if x.ndim >= 1 and x.shape[0] % 8 == 0 else P()


def _spec_222(x):  # on (2,2,2): another layout
    return P("fsdp", "tensor") if x.ndim == 2 else (P("tensor") if x.ndim == 1 and x.shape[0] % 2 == 0 else P())


def _put(tree, mesh, spec_fn):
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec_fn(x))), tree)


def _abstract(fn, mesh, spec_fn):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec_fn(x))),
                        jax.eval_shape(fn))


def _train_state(seed=0):
    """What the loop saves: nnx params, the optax state of a masked, chained AdamW, the step."""
    model = nnx.Linear(16, 8, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-2, mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)))
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments
    params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(1)}


def _cache(seed=0):
    k = jax.random.key(seed)
    return {"layer_0": {"k": jax.random.normal(k, (8, 4, 2)), "ssm": jnp.arange(16.0).reshape(8, 2)}}


def _iterator(advance):
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    for _ in range(advance):
        next(it)
    return it


def _meta(**model):
    return {"config": {"model": {"d_model": 16, "seq_len": 64, "block_len": 16, "dtype": "float32", **model},
                       "train": {"global_batch_size": 8}},
            "tokens_seen": 1234}


def _assert_equal_trees(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_on_8_restore_on_222_reshards_and_repositions_data(tmp_path):
    mesh8, mesh222 = _mesh((8, 1, 1)), _mesh((2, 2, 2))
    state, cache = _put(_train_state(), mesh8, _spec_8), _put(_cache(), mesh8, _spec_8)
    expected_state, expected_cache = jax.tree.map(np.asarray, (state, cache))
    it = _iterator(5)

    ck = Checkpointer(str(tmp_path / "ck"), every=2, keep_last=2)
    assert not ck.should_save(3) and ck.should_save(4) and not ck.should_save(0)
    assert not ck.save(3, state=state, cache=cache, data_iter=it, meta=_meta())
    assert ck.save(4, state=state, cache=cache, data_iter=it, meta=_meta())
    # The async save captured everything already: the caller may donate the buffers and move on.
    jax.tree.map(lambda x: x.delete(), (state, cache))
    assert next(it) == 5 and next(it) == 6
    ck.wait()
    assert ck.latest_step() == 4
    ck.close()

    ck = Checkpointer(str(tmp_path / "ck"), every=2, keep_last=2)
    abstract_state = _abstract(_train_state, mesh222, _spec_222)
    # abstract_tree moves shardings onto another mesh, keeping their specs.
    abstract_cache = abstract_tree(_abstract(_cache, mesh8, _spec_222), mesh222)
    fresh = _iterator(0)
    state2, cache2, meta, step = ck.restore(abstract_state=abstract_state, abstract_cache=abstract_cache,
                                            data_iter=fresh)
    assert step == 4 and meta["step"] == 4 and meta["tokens_seen"] == 1234
    assert meta["format_version"] == FORMAT_VERSION and meta["code_version"]
    _assert_equal_trees(state2, expected_state)
    _assert_equal_trees(cache2, expected_cache)
    assert isinstance(state2["params"], nnx.State)
    kernel = state2["params"]["kernel"][...]
    assert kernel.sharding == NamedSharding(mesh222, P("fsdp", "tensor"))
    assert cache2["layer_0"]["k"].sharding.mesh.devices.shape == (2, 2, 2)
    assert next(fresh) == 5  # the position at save time, not after
    ck.close()


def _save_steps(directory, steps, *, keep_last=10, keep_every=0, cache=None):
    mesh = _mesh((8, 1, 1))
    it = _iterator(0)
    ck = Checkpointer(directory, every=1, keep_last=keep_last, keep_every=keep_every)
    for s in steps:
        state = _put({"w": jnp.full((8, 4), float(s))}, mesh, _spec_8)
        next(it)
        ck.save(s, state=state, cache={} if cache is None else cache, data_iter=it, meta=_meta())
    ck.wait()
    return ck


def _abstract_w():
    return abstract_tree({"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)}, _mesh((2, 2, 2)))


def test_retention_keeps_last_n_plus_every_k(tmp_path):
    ck = _save_steps(str(tmp_path), range(1, 10), keep_last=2, keep_every=4)
    assert ck.all_steps() == [4, 8, 9]
    ck.close()


def test_corrupted_newest_step_falls_back_with_a_log_line(tmp_path, caplog):
    directory = str(tmp_path / "ck")
    _save_steps(directory, [1, 2, 3]).close()
    # Truncate the array data of step 3's state item (OCDBT data files under state/d/).
    data_dir = os.path.join(directory, "3", "state", "d")
    for name in os.listdir(data_dir):
        path = os.path.join(data_dir, name)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    # A half-written step (the temporary directory of a save killed midway) is never a candidate.
    os.makedirs(os.path.join(directory, "4.orbax-checkpoint-tmp-123", "state"))

    ck = Checkpointer(directory, every=1, keep_last=10)
    assert ck.latest_step() == 3
    it = _iterator(0)
    with caplog.at_level(logging.WARNING, logger="bst_dist.train.checkpoint"):
        state, cache, meta, step = ck.restore(abstract_state=_abstract_w(), abstract_cache={}, data_iter=it)
    assert step == 2 and meta["step"] == 2 and cache == {}
    np.testing.assert_array_equal(np.asarray(state["w"]), 2.0)
    assert next(it) == 2  # two elements consumed before step 2's save
    assert any("checkpoint step 3 is unreadable (" in r.getMessage() and "falling back to step 2" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]

    # Resuming from 2 re-trains step 3: its save replaces the unreadable one instead of keeping it;
    # the restored step itself is not rewritten.
    mesh = _mesh((8, 1, 1))
    assert not ck.save(2, state=_put({"w": jnp.zeros((8, 4))}, mesh, _spec_8), cache={}, data_iter=it,
                       meta=_meta(), force=True)
    assert ck.save(3, state=_put({"w": jnp.full((8, 4), 3.0)}, mesh, _spec_8), cache={}, data_iter=it,
                   meta=_meta(), force=True)
    ck.wait()
    state, _, _, step = ck.restore(abstract_state=_abstract_w(), abstract_cache={}, data_iter=_iterator(0))
    assert step == 3
    np.testing.assert_array_equal(np.asarray(state["w"]), 3.0)
    ck.close()

    with pytest.raises(NoReadableCheckpoint):
        Checkpointer(directory, every=1, keep_last=10).restore(
            abstract_state={"w": jax.ShapeDtypeStruct((3, 3), jnp.float32)},  # wrong everywhere
            abstract_cache={}, data_iter=_iterator(0), step=2)


def test_restore_empty_dir_raises(tmp_path):
    ck = Checkpointer(str(tmp_path), every=1, keep_last=1)
    assert ck.latest_step() is None
    with pytest.raises(FileNotFoundError):
        ck.restore(abstract_state=_abstract_w(), abstract_cache={}, data_iter=_iterator(0))
    ck.close()


def test_missing_cache_is_refused_and_other_process_counts_restore(tmp_path):
    directory = str(tmp_path / "ck")
    _save_steps(directory, [1]).close()  # with an empty cache: no cache item
    ck = Checkpointer(directory, every=1, keep_last=1)
    with pytest.raises(IncompatibleCheckpoint, match="step 1 has no cache"):
        ck.restore(abstract_state=_abstract_w(), abstract_cache=_abstract_w(), data_iter=_iterator(0))
    ck.close()
    data_dir = os.path.join(directory, "1", "data")
    os.rename(os.path.join(data_dir, "process_0-of-1.json"), os.path.join(data_dir, "process_0-of-2.json"))
    integrity.write_manifest(os.path.join(directory, "1"))  # as a 2-process run would have written it
    # the lane loader's files hold every lane: a position written by 2 processes restores here
    ck = Checkpointer(directory, every=1, keep_last=1)
    it = _iterator(0)
    ck.restore(abstract_state=_abstract_w(), abstract_cache={}, data_iter=it)
    assert next(it) == next(_iterator(1))
    ck.close()


def test_check_compatible_names_the_difference(tmp_path):
    job = {"model": {"d_model": 128, "seq_len": 64, "block_len": 16, "dtype": "bfloat16"},
           "train": {"global_batch_size": 8}}
    meta = {**_meta(d_model=256), "step": 200}
    with pytest.raises(IncompatibleCheckpoint, match=r"^checkpoint runs/x/checkpoints step 200 has "
                                                     r"model\.d_model=256, the job has 128$"):
        check_compatible(meta, job, source="runs/x/checkpoints")
    check_compatible({**_meta(d_model=128), "step": 1}, job)  # dtype may differ
    for key, value, name in [("seq_len", 128, "model.seq_len"), ("block_len", 32, "model.block_len")]:
        bad = {**job, "model": {**job["model"], key: value}}
        with pytest.raises(IncompatibleCheckpoint, match=name):
            check_compatible({**_meta(d_model=128), "step": 1}, bad)
    with pytest.raises(IncompatibleCheckpoint, match="train.global_batch_size=8, the job has 16"):
        check_compatible({**_meta(d_model=128), "step": 1}, {**job, "train": {"global_batch_size": 16}})

    # Checked by restore before reading the arrays, and read_meta gives the meta alone.
    directory = str(tmp_path / "ck")
    _save_steps(directory, [1]).close()
    ck = Checkpointer(directory, every=1, keep_last=1)
    assert ck.read_meta()["config"]["model"]["d_model"] == 16
    with pytest.raises(IncompatibleCheckpoint, match="model.d_model=16, the job has 128"):
        ck.restore(abstract_state=_abstract_w(), abstract_cache={}, data_iter=_iterator(0), job_config=job)
    ck.close()


def test_preemption_guard_turns_sigterm_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and any_process(guard.requested)
    assert signal.getsignal(signal.SIGTERM) is before
    assert PREEMPTED_EXIT_CODE == 128 + signal.SIGTERM and guard.exit_code == PREEMPTED_EXIT_CODE
    assert not any_process(False)


def test_preemption_guard_turns_ctrl_c_into_a_flag_and_a_second_one_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the step finishes, then a checkpoint
        assert guard.requested and guard.exit_code == INTERRUPTED_EXIT_CODE == 128 + signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the previous handler: stop at once
    assert signal.getsignal(signal.SIGINT) is before

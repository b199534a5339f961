"""Parameters without the optimizer: a run's checkpoint and its export load the same model
(bfloat16 export within bf16 rounding), `load_init_params` fills a new model's abstract tree and
names the first mismatched parameter, and bad sources are one line."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bst_dist import config
from bst_dist.generate import generate, params as params_lib
from bst_dist.generate.params import ParamsError


def _train_params(run_dir, step):
    """The params subtree as training left it, read with the full train-state restore."""
    from bst_dist import sharding
    from bst_dist.train import state as state_lib
    from bst_dist.train.checkpoint import Checkpointer
    from train_utils import REFERENCE_JOB, make_cfg

    cfg = make_cfg(REFERENCE_JOB, run_dir)
    setup, abs_state, _ = state_lib.plan(cfg, sharding.make_mesh(cfg.mesh))
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), every=2, keep_last=3)
    try:
        state, _, _ = ckpt.restore_state(abstract_state=abs_state, step=step)
    finally:
        ckpt.close()
    return cfg, state["params"].to_pure_dict()


def _leaves(tree):
    return [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]


def test_run_checkpoint_and_export_load_the_trained_params(tiny_reference, tmp_path):
    run_dir, _ = tiny_reference
    cfg, want = _train_params(run_dir, 6)
    model, info = params_lib.load_model(run_dir)  # newest step, params only
    assert info["step"] == 6 and model.cfg == cfg.model
    for a, b in zip(_leaves(nnx.split(model)[1].to_pure_dict()), _leaves(want)):
        np.testing.assert_array_equal(a, b)
    older, info4 = params_lib.load_model(os.path.join(run_dir, "checkpoints", "4"))
    assert info4["step"] == 4

    out = tmp_path / "export"
    meta = params_lib.export(run_dir, str(out))
    assert meta["tokenizer"] == "gpt2" and meta["step"] == 6 and sorted(os.listdir(out)) == ["export.json", "params"]
    exported, _ = params_lib.load_model(str(out))
    for a, b in zip(_leaves(nnx.split(exported)[1].to_pure_dict()), _leaves(want)):
        np.testing.assert_array_equal(a, b)
    ids = [50256, 464, 3290]
    np.testing.assert_array_equal(generate(model, ids, max_tokens=5, top_k=1),
                                  generate(exported, ids, max_tokens=5, top_k=1))

    bf = tmp_path / "bf16"
    params_lib.export(str(out), str(bf), dtype="bfloat16")  # an export re-exports
    half, _ = params_lib.load_model(str(bf))
    for a, b in zip(_leaves(nnx.split(half)[1].to_pure_dict()), _leaves(want)):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-6)

    # init_from: same model -> the trained values in the new model's abstract tree
    _, abstract = params_lib.abstract_params(cfg.model)
    init = params_lib.load_init_params(str(out), cfg.model, abstract)
    for a, b in zip(_leaves(init.to_pure_dict()), _leaves(want)):
        np.testing.assert_array_equal(a, b)
    # another model: one line naming the parameter and both shapes
    other = config.replace(cfg.model, mlp_dim=2 * cfg.model.mlp_dim)
    _, abstract_other = params_lib.abstract_params(other)
    with pytest.raises(ParamsError, match=r"parameter layers/0/.*has shape \(32, 64\).*\(32, 128\)"):
        params_lib.load_init_params(run_dir, other, abstract_other)
    with pytest.raises(ParamsError, match="mlp|shape"):
        params_lib.load_model(str(out), expect=other)
    with pytest.raises(ParamsError, match="not empty"):
        params_lib.export(run_dir, str(out))


def test_bad_sources(tmp_path):
    with pytest.raises(ParamsError, match="neither a run directory"):
        params_lib.load_model(str(tmp_path))
    (tmp_path / "job.yaml").write_text("model: {}\n")
    with pytest.raises(ParamsError, match="no checkpoint"):
        params_lib.load_model(str(tmp_path))
    with pytest.raises(ParamsError, match="dtype"):
        params_lib.export(str(tmp_path), str(tmp_path / "o"), dtype="int8")

"""Parameters without the optimizer: a run's checkpoint and its export load the same model
(bfloat16 export within bf16 rounding), `load_init_params` fills a new model's abstract tree and
names the first mismatched parameter, and bad sources are one line."""

import dataclasses
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
    from bst_dist import parallel
    from bst_dist.train import state as state_lib
    from bst_dist.train.checkpoint import Checkpointer
    from tests.helpers.runs import make_cfg
    from tests.helpers.tiny import REFERENCE_JOB

    cfg = make_cfg(REFERENCE_JOB, run_dir)
    setup, abs_state, _ = state_lib.plan(cfg, parallel.make_mesh(cfg.mesh))
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
    other = dataclasses.replace(cfg.model, mlp_dim=2 * cfg.model.mlp_dim)
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


def _cli(capsys, *argv):
    from bst_dist.commands.main import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_and_export_commands(tiny_reference, tmp_path, capsys):
    run_dir, _ = tiny_reference
    rc, out, err = _cli(capsys, "generate", run_dir, "--prompt", "def main():", "--max-tokens", "6", "--top-k", "1")
    assert rc == 0, err
    model, _ = params_lib.load_model(run_dir)
    from data_pipelines.tokenizer import EOT, get_tokenizer

    enc = get_tokenizer()
    ids = generate(model, [EOT, *enc.encode_ordinary("def main():")], max_tokens=6, top_k=1)[0].tolist()
    want = enc.decode(ids[:ids.index(EOT)] if EOT in ids else ids)
    assert out == want + "\n"
    rc, out, err = _cli(capsys, "export", run_dir, "--out", str(tmp_path / "e"), "--dtype", "bfloat16")
    assert rc == 0, err
    rc, out, err = _cli(capsys, "generate", str(tmp_path / "e"), "--prompt", "x", "--max-tokens", "2", "--batch", "2")
    assert rc == 0 and "--- sample 1 ---" in out, err


def test_generate_refuses_a_checkpoint_of_another_model(tiny_reference, tmp_path, capsys):
    import shutil

    import yaml

    run_dir, _ = tiny_reference
    other = tmp_path / "other"
    shutil.copytree(os.path.join(run_dir, "checkpoints", "6"), other / "checkpoints" / "6")
    with open(os.path.join(run_dir, "job.yaml")) as f:
        job = yaml.safe_load(f)
    job["model"]["d_model"] = 64
    (other / "job.yaml").write_text(yaml.safe_dump(job))
    rc, out, err = _cli(capsys, "generate", str(other), "--prompt", "x")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "model.d_model" in err, err


@pytest.mark.parametrize("extra,match", [
    (["--prompt", ""], "prompt is empty"), (["--prompt", "x", "--temperature", "0"], "temperature"),
    (["--prompt", "x", "--top-p", "1.5"], "top_p"), (["--prompt", "x", "--top-k", "0"], "top_k"),
])
def test_generate_bad_input_is_one_line(tmp_path, capsys, extra, match):
    rc, out, err = _cli(capsys, "generate", str(tmp_path), *extra)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and match in err, err

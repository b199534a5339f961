"""Fine-tuning from a run: `train.init_from` starts a new run at step 0 from another run's (or an
export's) parameters with a fresh optimizer; a model that does not match is one line naming the
parameter; `bst-dist eval` takes an export plus a job file and agrees with the run it came from."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from bst_dist import parallel
from bst_dist.generate import params as params_lib
from bst_dist.generate.params import ParamsError
from bst_dist.train import state as state_lib

from tests.helpers.paths import REPO
from tests.helpers.runs import checkpoint_steps, make_cfg, train_in_process
from tests.helpers.tiny import REFERENCE_JOB, job_dict, write_job



def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_init_from_export_gives_its_params_a_fresh_optimizer_and_step_0(tiny_reference, tmp_path):
    run_dir, _ = tiny_reference
    export = str(tmp_path / "export")
    params_lib.export(run_dir, export)
    want = params_lib.read_source(export)[1]

    cfg = make_cfg(REFERENCE_JOB, tmp_path / "finetune", [f"train.init_from={export}", "train.optimizer.lr=0.0001"])
    start = state_lib.initial_state(cfg, parallel.make_mesh(cfg.mesh), None)
    assert start.step == 0 and int(start.state["step"]) == 0 and start.meta == {}
    got = start.state["params"].to_pure_dict()
    for a, b in zip(_leaves(got), _leaves(want)):
        np.testing.assert_array_equal(a, b)
    fresh = start.setup.tx.init(start.state["params"])  # the optimizer state of these params, untouched
    for a, b in zip(_leaves(start.state["opt_state"]), _leaves(fresh)):
        np.testing.assert_array_equal(a, b)
    assert any(isinstance(s, optax.ScaleByAdamState) for s in jax.tree.leaves(
        start.state["opt_state"], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)))



@pytest.mark.slow  # a training run; the initial state above is the property, this shows the run uses it
def test_a_fine_tune_trains_and_checkpoints_as_its_own_run(tiny_reference, tmp_path):
    export = str(tmp_path / "export")
    params_lib.export(tiny_reference[0], export)
    summary = train_in_process(REFERENCE_JOB, tmp_path / "finetune",
                               [f"train.init_from={export}", "train.steps=2", "checkpoint.every=2"])
    assert summary["start_step"] == 0 and checkpoint_steps(tmp_path / "finetune") == [2]


def test_init_from_another_model_is_one_line(tiny_reference, tmp_path):
    run_dir, _ = tiny_reference
    job = job_dict(model={"mlp_dim": 128}, train={"steps": 2, "init_from": run_dir})
    with pytest.raises(ParamsError, match=r"parameter layers/0/\S+ has shape \(32, 64\), the model needs \(32, 128\)"):
        train_in_process(job, tmp_path / "other")
    with pytest.raises(ParamsError, match="neither a run directory"):
        train_in_process(job_dict(train={"steps": 2, "init_from": str(tmp_path)}), tmp_path / "nowhere")


def test_eval_accepts_an_export_with_a_job(tiny_reference, tmp_path):
    from bst_dist.eval.run import evaluate_run

    run_dir = str(tmp_path / "run")
    shutil.copytree(tiny_reference[0], run_dir)  # eval writes its result beside the parameters
    export = str(tmp_path / "export")
    params_lib.export(run_dir, export)
    job = write_job(tmp_path / "job.yaml", train={"run_dir": str(tmp_path / "unused")})
    from_run = evaluate_run(run_dir, max_batches=1)
    from_export = evaluate_run(export, job=job, max_batches=1)
    assert from_export["step"] == from_run["step"] == 6
    assert from_export["streamed"] == pytest.approx(from_run["streamed"], rel=1e-6)
    assert os.path.isfile(os.path.join(export, "eval_validation_step6.json"))

    p = subprocess.run([sys.executable, "-m", "bst_dist", "eval", export], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "--job" in lines[0], lines

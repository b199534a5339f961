"""train.profile_steps: [start, stop] writes one JAX profiler trace (an .xplane.pb for TensorBoard's
profile plugin, under <run_dir>/tb) holding steps start+1..stop and no others. The steps are
read back from the trace itself: the loop marks each step with a StepTraceAnnotation whose
step_num the trace records."""

import glob
import os

import jax
import numpy as np
import pytest

from tests.helpers.runs import losses_of, make_cfg, train_in_process
from tests.helpers.tiny import job_dict


def traced_steps(run_dir) -> tuple[list[str], list[int]]:
    """(the .xplane.pb files under <run_dir>/tb, the step numbers of the `train` steps they hold)."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(str(run_dir), "tb", "plugins", "profile", "*", "*.xplane.pb")))
    steps = []
    for path in files:
        for plane in ProfileData.from_file(path).planes:
            for line in plane.lines:
                steps += [int(dict(ev.stats)["step_num"]) for ev in line.events if ev.name == "train"]
    return files, sorted(steps)


def test_the_profile_hook_traces_exactly_the_window(tmp_path):
    """The Profile hook driven step by step as the loop drives it (the loop's StepTraceAnnotation
    around a real jitted update), without building a model: steps 2..3 of 5 are traced."""
    from bst_dist.train.hooks import Profile, Run

    cfg = make_cfg(job_dict(train={"steps": 5, "profile_steps": [1, 3]}), tmp_path / "run")
    update = jax.jit(lambda x: x @ x * 0.5)
    run = Run(cfg, setup=None, ckpt=None, loader=None, state={"x": np.eye(64, dtype=np.float32)}, cache={}, step=0)
    hook = Profile()
    hook.on_start(run)
    for _ in range(cfg.train.steps):
        with jax.profiler.StepTraceAnnotation("train", step_num=run.step + 1):
            run.state = {"x": update(run.state["x"])}
            run.step += 1
        hook.after_step(run)
    hook.on_end(run, True)
    files, steps = traced_steps(tmp_path / "run")
    assert len(files) == 1 and os.path.getsize(files[0]) > 0
    assert steps == [2, 3]


@pytest.mark.slow  # one tiny training run: ~30 s on 2 shared cores
def test_a_training_run_writes_a_trace_of_the_profiled_steps(tmp_path):
    job = job_dict(model={"num_layers": 1, "bst_layers": [], "brect_layers": [], "seq_len": 32, "block_len": 16},
                   train={"steps": 4, "profile_steps": [1, 3]}, checkpoint={"every": 100})
    run_dir = tmp_path / "run"
    train_in_process(job, run_dir)
    files, steps = traced_steps(run_dir)
    assert len(files) == 1, files
    assert steps == [2, 3]
    assert len(losses_of(run_dir)) == 4  # the run itself went on to its last step

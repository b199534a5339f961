"""`bst-dist train` under its embedded local Ray (a real head on 127.0.0.1, started and stopped
by the command itself), on a job that goes non-finite: what the user sees and what is left.

* The NaN stop ends the job failed, once: one line naming the cause (exit 2), no traceback, no
  restart of the worker group although ray.max_failures allows two.
* Each skipped step is marked on its progress line.
* Ray's files live in a private (0700) folder, removed at the end.
* Neither the machine's libtpu log folder (TPU_LOG_DIR, here a folder holding a marker line) nor
  Ray's harmless error-level PreemptionWatcher line reaches the output.

lr 1e38 (no warmup, constant) makes step 1's update overflow the parameters' scale: the loss of
step 2 on is infinite, so steps 2 and 3 are skipped and, with train.max_nan_steps=1, the run stops
after step 3 with a checkpoint.
"""

import os
import re
import stat
import subprocess
import sys

import pytest

pytest.importorskip("ray")

from tests.helpers.paths import LOCAL_TINY as JOB, REPO  # noqa: E402

SETS = ["model.num_layers=2", "model.bst_layers=[1]", "model.d_model=64", "model.num_heads=4", "model.head_dim=16",
        "model.mlp_dim=128", "train.steps=6", "train.log_every=3", "checkpoint.every=100",
        "train.optimizer.lr=1e38", "train.optimizer.warmup_steps=0", "train.optimizer.schedule=constant",
        "train.max_nan_steps=1", "ray.max_failures=2"]
STOP = ("bst-dist train: error: 2 non-finite steps in a row (train.max_nan_steps=1); saved step 3; lower the "
        "learning rate or check the data")


def test_a_nan_stop_under_ray_ends_once_in_one_line_with_quiet_private_ray(tmp_path):
    machine_tpu_logs = tmp_path / "tpu_logs"
    machine_tpu_logs.mkdir()
    (machine_tpu_logs / "tpu_driver.vm.log.ERROR.1").write_text("E1202 MARKER-FROM-THE-MACHINE-TPU-LOGS\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TPU_LOG_DIR=str(machine_tpu_logs), RAY_COLOR_PREFIX="0")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "bst_dist", "train", JOB, *sum((["--set", s] for s in SETS), []),
           "--set", f"train.run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, private = [], None
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            m = re.search(r"files in (\S+)\); stopped when the run ends", line)
            if m:  # checked while the head runs
                ray_dir = m.group(1)
                private = os.path.dirname(ray_dir)
                assert stat.S_IMODE(os.stat(private).st_mode) == 0o700, oct(os.stat(private).st_mode)
                assert os.path.isdir(ray_dir) and os.path.basename(private).startswith("bst-ray-")
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "\n".join(lines)
    assert rc == 2, out
    assert lines[-1] == STOP, out
    assert out.count("Started training worker group") == 1, out  # never restarted
    assert "Traceback" not in out and "RETRY" not in out, out
    assert "step 2/6 loss non-finite: step skipped (1 so far)" in out, out
    assert "step 3/6 loss non-finite: step skipped (2 so far)" in out, out
    assert "MARKER-FROM-THE-MACHINE-TPU-LOGS" not in out, out
    assert "PreemptionWatcher" not in out, out
    assert private is not None and not os.path.exists(private)  # the head's files went with it
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["3"]  # the stop's checkpoint

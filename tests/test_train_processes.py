"""Restore onto another process count continues exactly: 2 real JAX processes (4 CPU devices
each, one global mesh) train to step 4; 1 process with 8 devices resumes to step 8. The losses
and final parameters match an uninterrupted 1-process run (float32, 1e-5 relative): lanes are
global, every process's data file holds every lane, arrays reshard on restore."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from train_utils import REPO, metrics_lines, train_subprocess, write_job

CONSTANT_LR = ["--set", "train.optimizer.schedule=constant"]  # so that train.steps=4 then 8 share a schedule


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(p):
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]


def test_two_processes_then_one_equals_one(tmp_path):
    job = write_job(tmp_path / "job.yaml")
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = train_subprocess(job, ref_dir, *CONSTANT_LR)
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, "-m", "bst_dist", "train", "--no-ray", job, "--set", f"train.run_dir={run_dir}",
                               "--set", "train.steps=4", *CONSTANT_LR, "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for p in procs:
        run(p)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints", "4", "data"))) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    run(train_subprocess(job, run_dir, *CONSTANT_LR))  # one process, 8 devices, to step 8
    run(ref)
    got = [json.loads(line)["loss"] for line in metrics_lines(run_dir)]
    want = [json.loads(line)["loss"] for line in metrics_lines(ref_dir)]
    assert len(got) == len(want) == 8
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with open(os.path.join(run_dir, "summary.json")) as f:
        assert json.load(f)["start_step"] == 4

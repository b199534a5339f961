"""The run-directory lock (bst_dist.train.lock) between real processes: a live holder refuses a
second run naming its host, pid and start time (also through `bst-dist train`, in one line); a
holder killed with SIGKILL leaves a lock that the next run takes over; a lock of the same job id
(a restarted Ray worker group, possibly on another host) is taken over; another host's lock of
another job is refused; the lock is gone when the run ends."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from bst_dist.train.lock import LOCK_FILE, RunLock, RunLocked

from tests.helpers.paths import REPO
from tests.helpers.tiny import TINY_JOB

HOLD = """
import sys, time
from bst_dist.train.lock import RunLock
lock = RunLock(sys.argv[1], job=sys.argv[2] or None).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(run_dir, job=""):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), job], env=dict(os.environ, PYTHONPATH=REPO),
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _lock(run_dir) -> dict:
    with open(os.path.join(run_dir, LOCK_FILE)) as f:
        return json.load(f)


def test_a_live_holder_refuses_a_second_run_and_a_killed_one_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    p = _holder(run_dir)
    try:
        holder = _lock(run_dir)
        assert holder["pid"] == p.pid and holder["host"] == socket.gethostname()
        with pytest.raises(RunLocked) as e:
            RunLock(str(run_dir)).acquire()
        msg = str(e.value)
        assert f"pid {p.pid} on host {socket.gethostname()} since {holder['started']}" in msg and "\n" not in msg
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert _lock(run_dir)["pid"] == p.pid  # SIGKILL: nobody removed it
    with RunLock(str(run_dir)) as lock:
        assert _lock(run_dir)["pid"] == os.getpid() and lock.held
    assert not (run_dir / LOCK_FILE).exists()


def test_same_job_takes_over_and_another_host_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    p = _holder(run_dir, job="ray:01000000")
    try:
        with pytest.raises(RunLocked):
            RunLock(str(run_dir), job="ray:02000000").acquire()
        lock = RunLock(str(run_dir), job="ray:01000000").acquire()  # the same job's new worker group
        assert _lock(run_dir)["pid"] == os.getpid()
        lock.release()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # a holder on another host cannot be checked from here: refused, even with a dead-looking pid
    os.makedirs(run_dir, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1 << 22, "started": "then", "job": None}))
    with pytest.raises(RunLocked, match="pid 4194304 on host elsewhere since then"):
        RunLock(str(run_dir)).acquire()


def test_cli_refuses_a_run_dir_in_use_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(TINY_JOB))
    p = _holder(run_dir)
    try:
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
                   PYTHONPATH=REPO)
        t0 = time.time()
        cli = subprocess.run([sys.executable, "-m", "bst_dist", "train", "--no-ray", str(job), "--set",
                              f"train.run_dir={run_dir}"], env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=300)
        assert cli.returncode == 2, cli.stderr[-3000:]
        last = cli.stderr.strip().splitlines()[-1]
        assert last.startswith(f"bst-dist train: error: train.run_dir {run_dir} is in use by another run "
                               f"(pid {p.pid} on host {socket.gethostname()} since "), last
        assert "Traceback" not in cli.stderr
        assert not (run_dir / "job.yaml").exists() and not (run_dir / "checkpoints").exists()
        assert time.time() - t0 < 120
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()

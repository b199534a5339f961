"""Ray Train orchestration on a real Ray head bound to 127.0.0.1, shared by every test here: one
head per test run, also across pytest-xdist workers (Ray queues a job until the last one frees
the CPUs). The training loop is the real one (bst_dist.train.loop) on a tiny float32 model;
failures are injected from a wrapper around it that signals its own worker process when a
trigger file names its rank and step.

Slow by nature on 2 cores (each Ray worker group imports JAX and compiles); the costly runs are
shared: one uninterrupted 2-worker run is the reference for the equality, kill and SIGTERM tests.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from filelock import FileLock

ray = pytest.importorskip("ray")

from bst_dist import config, launch  # noqa: E402
from bst_dist.launch.local import SINGLE_NODE_ENV, LocalRay, connect  # noqa: E402
from bst_dist.launch.ray_trainer import TrainingFailed  # noqa: E402

from tests.helpers.paths import LOCAL_TINY as JOB, REPO
from tests.helpers.tiny import tiny_sets

BIN = os.path.dirname(sys.executable)
# local_tiny with the tiny model in two layers, [block, bst]; synchronous checkpoints every 2
# steps, so a kill right after step k's report always finds step 2*floor(k/2) complete. The
# worker's device count stays last (the submit test leaves it out).
TINY = [*tiny_sets(num_layers=2, brect_layers=[]), "train.steps=6", "train.global_batch_size=8", "train.log_every=3",
        "checkpoint.every=2", "checkpoint.async_save=false", "ray.cpu_devices_per_worker=4"]

# The test module is not importable on Ray workers: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def tiny(run_dir, *extra) -> config.JobConfig:
    return config.load(JOB, [*TINY, f"train.run_dir={run_dir}", *extra])


def arm(run_dir, rank: int, step: int, sig: str) -> None:
    """Make rank `rank` send itself SIG`sig` right after reporting step `step` (once). The loop
    reports at its log steps, so a test that arms step k sets train.log_every=1."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, f"signal-rank{rank}-step{step}"), "w") as f:
        f.write(sig)


def train_with_signals(cfg, *, report, stop=None):
    """The real loop; after each report, fire an armed signal at this process (see `arm`)."""
    import jax

    from bst_dist.train.loop import train

    def report_then_signal(metrics):
        report(metrics)
        path = os.path.join(cfg.train.run_dir, f"signal-rank{jax.process_index()}-step{metrics['step']}")
        if os.path.exists(path):
            with open(path) as f:
                sig = f.read().strip()
            os.remove(path)
            os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))

    if "stop" in inspect.signature(train).parameters:
        return train(cfg, report=report_then_signal, stop=stop)
    # A loop without the `stop` argument: make its PreemptionGuard read the launcher's event (it
    # cannot install a SIGTERM handler itself: Ray runs it outside the main thread).
    from bst_dist.train import loop

    class Guard(loop.PreemptionGuard):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if stop is not None:
                self._event = stop

    loop.PreemptionGuard = Guard
    return train(cfg, report=report_then_signal)


def die_at_once(cfg, *, report, stop=None):
    os.kill(os.getpid(), signal.SIGKILL)


def _shared_dir(tmp_path_factory):
    """A directory all pytest-xdist workers of this run share (CI runs `pytest -n 2`)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


class _Head:
    """What the tests need of the shared head: its addresses and token."""

    def __init__(self, info: dict):
        self.address, self.dashboard_url, self.token = info["address"], info["dashboard_url"], info["token"]

    def client_env(self) -> dict:
        return {**SINGLE_NODE_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}


@pytest.fixture(scope="session")
def head(tmp_path_factory):
    """One Ray head (with the job server) for the whole run, shared by the xdist workers through
    a file; the worker that started it stops it once no other worker uses it. Its PATH has this
    venv's `bst-dist`, as a cluster image that installs the project would."""
    shared = _shared_dir(tmp_path_factory)
    lock, info_path = FileLock(str(shared / "ray_head.lock")), shared / "ray_head.json"
    owned = None
    with lock:
        if info_path.exists():
            info = json.loads(info_path.read_text())
        else:
            owned = LocalRay(num_cpus=2, dashboard=True,
                             env={**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}).start()
            info = {"address": owned.address, "dashboard_url": owned.dashboard_url, "token": owned.token, "users": 0}
        info["users"] += 1
        info_path.write_text(json.dumps(info))
    h = _Head(info)
    connect(h.address, h.token)
    try:
        yield h
    finally:
        ray.shutdown()
        with lock:
            info = json.loads(info_path.read_text())
            info["users"] -= 1
            info_path.write_text(json.dumps(info))
        if owned is not None:
            deadline = time.monotonic() + 1800
            while json.loads(info_path.read_text())["users"] > 0 and time.monotonic() < deadline:
                time.sleep(1)
            with lock:
                owned.stop()
                info_path.unlink()


@pytest.fixture(scope="session")
def reference(head, tmp_path_factory):
    """The uninterrupted 2-worker run (4 fake devices each, one 8-device mesh), computed once."""
    shared = _shared_dir(tmp_path_factory)
    path = shared / "reference_summary.json"
    with FileLock(str(shared / "reference.lock")):
        if not path.exists():
            path.write_text(json.dumps(launch.train(tiny(shared / "reference"), workers=2)))
        return json.loads(path.read_text())


@pytest.mark.slow  # minutes on 2 cores; tests/train/test_train_processes.py proves multi-process equality without Ray
def test_two_workers_match_one_process_on_eight_devices(reference, tmp_path):
    import jax
    import numpy as np

    assert jax.device_count() == 8  # tests/data/conftest.py
    single = launch.train(tiny(tmp_path / "single"), no_ray=True)
    assert reference["final_step"] == single["final_step"] == 6
    assert len(reference["losses"]) == len(single["losses"]) == 6
    np.testing.assert_allclose(reference["losses"], single["losses"], rtol=1e-5)


def test_killed_worker_restarts_and_ends_with_the_same_params(reference, tmp_path):
    run_dir = tmp_path / "killed"
    arm(run_dir, rank=1, step=5, sig="KILL")
    # log_every=1: the loop reports (and so fires the armed signal) at every step, not in batches
    # at the log steps
    out = launch.train(tiny(run_dir, "ray.max_failures=1", "train.log_every=1"), workers=2,
                       train_fn=train_with_signals)
    assert out["start_step"] == 4  # the new worker group resumed from the step-4 checkpoint
    assert out["params_digest"] == reference["params_digest"]
    assert out["losses"] == pytest.approx(reference["losses"][4:], rel=1e-6)


def test_sigterm_saves_then_restarts_and_ends_with_the_same_params(reference, tmp_path):
    run_dir = tmp_path / "sigterm"
    arm(run_dir, rank=1, step=2, sig="TERM")
    # Periodic checkpoints at 5 (and 6) only: resuming before 5 proves the SIGTERM save. The
    # handler runs on the worker's main thread when Ray next checks signals, so the stop may
    # land a step late.
    out = launch.train(tiny(run_dir, "ray.max_failures=1", "checkpoint.every=5", "train.log_every=1"), workers=2,
                       train_fn=train_with_signals)
    assert 2 <= out["start_step"] < 5
    assert out["params_digest"] == reference["params_digest"]


def test_exhausted_retries_name_the_cause(head, tmp_path):
    cfg = tiny(tmp_path / "dies", "ray.max_failures=1")
    with pytest.raises(TrainingFailed, match=r"after 1 restart.*rank 0: worker process died"):
        launch.train(cfg, workers=1, train_fn=die_at_once)


def _checkpoint_steps(run_dir) -> list[int]:
    ckpt = os.path.join(run_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def test_ray_job_submit_then_bst_dist_submit_resumes(head, tmp_path):
    """`ray job submit --working-dir . -- jobs/local_tiny.yaml` (the executable YAML) trains two
    steps; `bst-dist submit` of the same job then resumes from that checkpoint to step 4."""
    run_dir = tmp_path / "submitted"
    sets = [a for s in [*TINY[:-1], f"train.run_dir={run_dir}"] for a in ("--set", s)]
    env = {**os.environ, **head.client_env()}
    env.pop("RAY_ADDRESS", None)
    first = subprocess.run([os.path.join(BIN, "ray"), "job", "submit", "--address", head.dashboard_url,
                            "--working-dir", REPO, "--", "jobs/local_tiny.yaml", *sets, "--set", "train.steps=2"],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "succeeded" in (first.stdout + first.stderr).lower()
    assert _checkpoint_steps(run_dir) == [2]
    assert "runtime_resources" in first.stdout  # the code ran from the uploaded working dir

    second = subprocess.run([os.path.join(BIN, "bst-dist"), "submit", "jobs/local_tiny.yaml", "--address",
                             head.dashboard_url, *sets, "--set", "train.steps=4"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "SUCCEEDED" in second.stderr
    assert "resumed from" in second.stdout
    assert _checkpoint_steps(run_dir)[-1] == 4
    with open(os.path.join(run_dir, "job.yaml")) as f:
        recorded = yaml.safe_load(f)
    # the resumed run's own resolved spec, with the path the workers wrote to
    assert recorded["train"]["steps"] == 4 and recorded["train"]["run_dir"] == str(run_dir)


@pytest.mark.slow  # minutes on 2 cores: a submitted job, a stop, a resume; tests/launch/test_launch_stop.py is the cheap case
def test_ray_job_stop_saves_the_current_step_and_the_resumed_run_is_the_same(head, reference, tmp_path):
    """`ray job stop` signals only the driver; the driver passes it to the workers (a Ray actor),
    which save the step they are at and return. Resuming from that checkpoint ends with the
    uninterrupted run's parameters. Periodic checkpoints are off, so the only one is the stop's."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    run_dir = tmp_path / "stopped"
    overrides = [*TINY, f"train.run_dir={run_dir}", "checkpoint.every=100", "train.log_every=1"]
    env = head.client_env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        c = JobSubmissionClient(head.dashboard_url)
        job_id = c.submit_job(
            entrypoint=f"{sys.executable} tests/launch/stop_driver.py {JOB} '{json.dumps(overrides)}'",
            runtime_env={"working_dir": REPO, "excludes": [".git", "runs/", "__pycache__/"],
                         "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}})
        deadline = time.monotonic() + 300
        while not (run_dir / "reported-2").exists():
            assert time.monotonic() < deadline and c.get_job_status(job_id) in (JobStatus.PENDING, JobStatus.RUNNING), \
                c.get_job_logs(job_id)[-3000:]
            time.sleep(0.2)
        t0 = time.monotonic()
        c.stop_job(job_id)
        while c.get_job_status(job_id) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
            assert time.monotonic() - t0 < 120, "the stop took longer than RAY_JOB_STOP_WAIT_TIME_S"
            time.sleep(0.2)
        logs = c.get_job_logs(job_id)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert c.get_job_status(job_id) == JobStatus.STOPPED, logs[-3000:]
    reported = max(int(p.name.split("-")[1]) for p in run_dir.glob("reported-*"))
    steps = _checkpoint_steps(run_dir)
    assert steps == [reported] and 2 <= reported < 6, (steps, reported, logs[-3000:])
    assert "asking every worker to checkpoint and stop" in logs

    out = launch.train(tiny(run_dir, "checkpoint.every=100"), workers=2)
    assert out["start_step"] == reported
    assert out["params_digest"] == reference["params_digest"]

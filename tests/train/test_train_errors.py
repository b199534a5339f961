"""What the training loop refuses and how it fails, on the tiny job (real Orbax on disk, the real
Grain loader on the stdlib corpus, real training, in this process with its 8 fake CPU devices):

* bad job values (mesh vs device count, batch vs data-parallel size, grad_accum) are refused with a
  one-line ConfigError before anything is compiled or written;
* a checkpoint location that cannot be written is refused at start in one line, and a save that
  fails later (a full disk) stops the run in one line naming the last good checkpoint; Ctrl-C
  saves a checkpoint like SIGTERM and exits 130;
* a checkpoint whose model shape, L, W or global batch differ from the job is refused
  (IncompatibleCheckpoint naming the key), also before anything is compiled, and without touching
  the run directory's job.yaml;
* a damaged newest checkpoint makes the rerun resume from the previous complete one, and the run
  then ends bitwise where the undamaged run ended;
* a step with a non-finite loss leaves parameters and optimizer state alone but consumes its batch,
  advances the cache and counts the step; too many in a row stop the run with a checkpoint.
"""

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

from bst_dist.config import ConfigError
from bst_dist.train.checkpoint import IncompatibleCheckpoint
from bst_dist.train.loop import TrainingError
from data_pipelines.loader import LaneLoader

from tests.helpers.paths import LOCAL_TINY, REPO
from tests.helpers.runs import (CompileCounter, checkpoint_steps, digest, losses_of, make_cfg, metrics_lines,
                                read_checkpoint, tmpfs, train_in_process)
from tests.helpers.tiny import REFERENCE_JOB, job_dict, tiny_sets

JOB = REFERENCE_JOB  # the job of the shared uninterrupted run (conftest.py: tiny_reference)
N = JOB["train"]["steps"]  # 6; checkpoints 2, 4, 6


def copy_run(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


# --------------------------------------------------------------------------------------------
# Bad job values


@pytest.mark.parametrize("overrides, message", [
    (["mesh.data=3"], ("mesh: data x fsdp x tensor = 3x1x1 = 3 does not match the 8 devices present; "
                       "use -1 on one axis to fill")),
    (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=3"], "mesh.tensor: 3 must divide model.num_heads=2"),
    (["train.global_batch_size=12"],
     "train.global_batch_size: global_batch_size 12 is not divisible by the data-parallel size (data x fsdp = 8)"),
    (["train.grad_accum=3"], "train.grad_accum: 3 must divide train.global_batch_size=8"),
    (["train.grad_accum=2"], ("train.global_batch_size: global_batch_size / grad_accum = 4 is not divisible by "
                              "the data-parallel size (data x fsdp = 8)")),
], ids=["mesh-vs-devices", "tensor-vs-heads", "batch-vs-data", "accum-vs-batch", "micro-batch-vs-data"])
def test_bad_job_values_fail_before_compiling(tmp_path, overrides, message):
    from bst_dist.train.loop import train

    run_dir = tmp_path / "run"
    with CompileCounter() as compiles, pytest.raises(ConfigError) as e:
        train(make_cfg(JOB, run_dir, overrides))  # load-time errors raise in make_cfg
    assert str(e.value) == message
    assert "\n" not in str(e.value)
    assert compiles.count == 0
    assert not run_dir.exists()  # nothing written either


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "bst_dist", "train", "--no-ray", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_reports_a_bad_mesh_in_one_line(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    p = _cli([str(job), "--set", f"train.run_dir={tmp_path / 'run'}", "--set", "mesh.data=3"])
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == ("bst-dist train: error: mesh: data x fsdp x tensor = 3x1x1 = 3 "
                                                 "does not match the 8 devices present; use -1 on one axis to fill")
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# Checkpoint locations that cannot be written

# jobs/local_tiny.yaml with the tiny model in two layers, [block, bst]: one checkpoint is about
# 20 MB (the GPT-2 embedding and its Adam moments)
TINY_OVERRIDES = [*tiny_sets(num_layers=2, brect_layers=[]), "train.log_every=1"]


def _local_tiny(run_dir, ckpt_dir, *sets: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, float]:
    args = [LOCAL_TINY, "--set", f"train.run_dir={run_dir}",
            "--set", f"checkpoint.dir={ckpt_dir}"]
    for kv in [*TINY_OVERRIDES, *sets]:
        args += ["--set", kv]
    t0 = time.monotonic()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", "bst_dist", "train", "--no-ray", *args], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=timeout, check=False)
    return p, time.monotonic() - t0


@contextlib.contextmanager
def _read_only_dir(tmp_path):
    """A directory this process cannot write: chmod 555 for a normal user; as root (whom chmod does
    not stop) a read-only tmpfs, else a path under a regular file."""
    d = tmp_path / "ro"
    if os.geteuid() != 0:
        d.mkdir()
        d.chmod(0o555)
        try:
            yield str(d), "Permission denied"
        finally:
            d.chmod(0o755)
        return
    with contextlib.ExitStack() as stack:
        try:
            yield stack.enter_context(tmpfs(d, "1m", read_only=True)), "Read-only file system"
            return
        except pytest.skip.Exception:
            pass
        (tmp_path / "file").write_text("x")
        yield str(tmp_path / "file" / "ck"), "Not a directory"


def test_cli_reports_an_unwritable_checkpoint_dir_at_start_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    with _read_only_dir(tmp_path) as (ckpt_dir, cause):
        p, took = _local_tiny(run_dir, ckpt_dir)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == (f"bst-dist train: error: checkpoint.dir {ckpt_dir} is not writable "
                                                 f"({cause}); choose a writable checkpoint.dir")
    assert "Traceback" not in p.stderr and "step 1/" not in p.stdout + p.stderr  # before any step
    assert took < 120, took  # no hang
    assert not (run_dir / "run.lock").exists()


def test_a_run_dir_that_cannot_be_created_is_refused_before_compiling(tmp_path):
    from bst_dist.errors import UserError
    from bst_dist.train.loop import train

    (tmp_path / "file").write_text("x")
    run_dir = tmp_path / "file" / "run"
    with CompileCounter() as compiles, pytest.raises(UserError) as e:
        train(make_cfg(JOB, run_dir))
    assert str(e.value) == (f"train.run_dir {run_dir} is not writable (Not a directory); "
                            "choose a writable train.run_dir")
    assert compiles.count == 0


@pytest.mark.slow
def test_cli_stops_at_a_save_that_fails_on_a_full_disk(tmp_path):
    """A 30 MB checkpoint location takes the step-2 checkpoint, not step 4's: the run stops right
    after, in one line naming the last good step, and a rerun with room resumes from it."""
    run_dir = tmp_path / "run"
    with tmpfs(tmp_path / "ck", "30m") as ckpt_dir:
        p, took = _local_tiny(run_dir, ckpt_dir, "train.steps=12", "checkpoint.every=2", "checkpoint.keep_last=1")
        assert p.returncode == 2, p.stderr[-3000:]
        assert p.stderr.strip().splitlines()[-1] == (
            f"bst-dist train: error: checkpoint step 4 could not be written to {ckpt_dir} (No space left on "
            "device); the run stops; the last good checkpoint is step 2")
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
        steps = [json.loads(line)["step"] for line in metrics_lines(str(run_dir))]
        assert 4 <= steps[-1] <= 8, steps  # found within a few steps of the failed save, not at the end
        assert not (run_dir / "run.lock").exists()
        kept = sorted(os.listdir(ckpt_dir))
        assert "2" in kept and "4" not in kept, kept
        shutil.copytree(ckpt_dir, tmp_path / "roomy")
    p, _ = _local_tiny(run_dir, tmp_path / "roomy", "train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr and "step 2" in p.stderr


@pytest.mark.slow  # one training compile; test_checkpoint.py sends a real SIGINT to the guard in the default suite
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "ck"
    args = [LOCAL_TINY, "--set", f"train.run_dir={run_dir}",
            "--set", f"checkpoint.dir={ckpt_dir}", "--set", "train.steps=200", "--set", "checkpoint.every=100"]
    for kv in TINY_OVERRIDES:
        args += ["--set", kv]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO)
    p = subprocess.Popen([sys.executable, "-m", "bst_dist", "train", "--no-ray", *args], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while len(metrics_lines(str(run_dir))) < 2:
        assert p.poll() is None and time.monotonic() < deadline, p.stdout.read()[-3000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    saved = [line for line in out.splitlines() if "interrupted: saved step" in line]
    assert len(saved) == 1, out[-3000:]
    step = int(saved[0].split("saved step ")[1].split(";")[0])
    assert step >= 2 and sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) == [step]
    assert (ckpt_dir / str(step) / "integrity.json").exists()  # complete and verified, not half-written
    assert [json.loads(line)["step"] for line in metrics_lines(str(run_dir))][-1] == step
    assert not (run_dir / "run.lock").exists()


# --------------------------------------------------------------------------------------------
# Checkpoints the job cannot continue from


@pytest.mark.parametrize("overrides, difference", [
    (["model.d_model=64", "model.head_dim=32"], "has model.d_model=32, the job has 64"),
    (["model.seq_len=128"], "has model.seq_len=64, the job has 128"),
    (["model.block_len=32"], "has model.block_len=16, the job has 32"),
    (["train.global_batch_size=16"], "has train.global_batch_size=8, the job has 16"),
], ids=["d_model", "L", "W", "global-batch"])
def test_incompatible_checkpoint_is_refused_naming_the_difference(tiny_reference, tmp_path, overrides, difference):
    run_dir = copy_run(tiny_reference[0], tmp_path / "run")
    with open(os.path.join(run_dir, "job.yaml"), "rb") as f:
        job_yaml = f.read()
    from bst_dist.train.loop import train

    with CompileCounter() as compiles, pytest.raises(IncompatibleCheckpoint) as e:
        train(make_cfg(JOB, run_dir, overrides))
    msg = str(e.value)
    assert msg == f"checkpoint {os.path.join(run_dir, 'checkpoints')} step {N} {difference}", msg
    assert compiles.count == 0  # refused before the model was built
    with open(os.path.join(run_dir, "job.yaml"), "rb") as f:
        assert f.read() == job_yaml  # the run dir still describes its checkpoints
    assert checkpoint_steps(run_dir) == [2, 4, 6]


def test_cli_reports_an_incompatible_checkpoint_in_one_line(tiny_reference, tmp_path):
    run_dir = copy_run(tiny_reference[0], tmp_path / "run")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    p = _cli([str(job), "--set", f"train.run_dir={run_dir}", "--set", "model.d_model=64", "--set", "model.head_dim=32"])
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("bst-dist train: error: checkpoint ")
    assert "has model.d_model=32, the job has 64" in p.stderr


# --------------------------------------------------------------------------------------------
# A damaged newest checkpoint


# Orbax's failed read of the damaged step leaves tensorstore callbacks aimed at its closed asyncio loop
# ("Event loop is closed", ignored by Python): noise from the library, not a failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_newest_checkpoint_resumes_from_the_previous_one(tiny_reference, tmp_path, caplog):
    ref_dir, ref = tiny_reference
    run_dir = copy_run(ref_dir, tmp_path / "run")
    # Truncate the array data of the newest step's state item (its OCDBT data files), as a bad
    # copy or a full disk would; the step directory itself is complete and listed.
    state_dir = os.path.join(run_dir, "checkpoints", str(N), "state")
    damaged = 0
    for root, _, files in os.walk(state_dir):
        if os.path.basename(root) == "d":
            for name in files:
                path = os.path.join(root, name)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                damaged += 1
    assert damaged

    with caplog.at_level(logging.INFO):
        got = train_in_process(JOB, run_dir)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"checkpoint step {N} is unreadable (") and m.endswith(f"falling back to step {N - 2}")
               for m in messages), messages
    assert any(m.startswith("resumed from") and m.endswith(f"step {N - 2}") for m in messages), messages
    assert any(m.startswith(f"replacing checkpoint step {N}") for m in messages), messages
    assert got["start_step"] == N - 2 and got["losses"] == ref["losses"][N - 2:]
    for key in ("params_digest", "opt_state_digest", "cache_digest"):
        assert got[key] == ref[key], key  # bitwise: the same mesh, the same data position
    assert losses_of(run_dir) == losses_of(ref_dir)
    # The damaged step was rewritten and reads back.
    assert digest(read_checkpoint(run_dir, N)["state"]) == digest(read_checkpoint(ref_dir, N)["state"])


# --------------------------------------------------------------------------------------------
# Non-finite steps


def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(tiny_reference, tmp_path, monkeypatch):
    """How the non-finite loss is made: the loader's batches of steps 2, 4 and 5 get one NaN in
    their loss_mask (lane 0, position 0), as corrupt input would. The loss of those steps, computed
    by the real jitted train step, is NaN, and so are the gradients; the forward pass (and so the
    new cache) does not read the mask, so it is the clean run's. Nothing else is changed: the
    checkpoint, metrics and stop logic run as in production. With train.max_nan_steps=1, step 2
    alone is skipped and the run continues; steps 4 and 5 make 2 in a row and stop it after 5."""
    ref_dir = tiny_reference[0]
    poisoned = {2, 4, 5}
    clean_next = LaneLoader.__next__

    def next_with_nan(self):
        batch = clean_next(self)
        if self.get_state()["step"] in poisoned:  # the step this batch is for (1-based)
            batch = dict(batch, loss_mask=batch["loss_mask"].copy())
            batch["loss_mask"][0, 0] = np.nan
        return batch

    monkeypatch.setattr(LaneLoader, "__next__", next_with_nan)
    job = job_dict(train={"steps": N, "max_nan_steps": 1}, checkpoint={"every": 1, "keep_last": N})
    run_dir = str(tmp_path / "run")
    with pytest.raises(TrainingError) as e:
        train_in_process(job, run_dir)
    assert str(e.value) == ("2 non-finite steps in a row (train.max_nan_steps=1); saved step 5; lower the "
                            "learning rate or check the data")
    monkeypatch.undo()

    records = [json.loads(line) for line in metrics_lines(run_dir)]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["skipped"] for r in records] == [0, 1, 0, 1, 1]
    assert [r["loss"] is not None for r in records] == [True, False, True, False, False]  # NaN: null in JSON
    assert records[0]["loss"] == losses_of(ref_dir)[0]  # step 1 is the clean run's
    assert checkpoint_steps(run_dir) == [1, 2, 3, 4, 5]  # the stop saved step 5

    ck = {s: read_checkpoint(run_dir, s) for s in [1, 2, 3, 4, 5]}
    ref_ck = read_checkpoint(ref_dir, 2)
    params = {s: digest(c["state"]["params"]) for s, c in ck.items()}
    opt = {s: digest(c["state"]["opt_state"]) for s, c in ck.items()}
    caches = {s: digest(c["cache"]) for s, c in ck.items()}
    # Step 2 (non-finite): parameters and optimizer state untouched, but the step counted ...
    assert params[2] == params[1] and opt[2] == opt[1]
    assert [int(ck[s]["state"]["step"]) for s in range(1, 6)] == [1, 2, 3, 4, 5]
    assert [ck[s]["meta"]["step"] for s in range(1, 6)] == [1, 2, 3, 4, 5]
    # ... its batch consumed (the data position is the clean run's after step 2) ...
    assert ck[2]["data"]["step"] == 2 and ck[2]["data"]["lanes"] == ref_ck["data"]["lanes"]
    # ... and the cache advanced exactly as in the clean run, whose parameters did move.
    assert caches[2] != caches[1] and caches[2] == digest(ref_ck["cache"])
    assert params[2] != digest(ref_ck["state"]["params"])
    # Step 3 is finite and updates; 4 and 5 are not and do not.
    assert params[3] != params[2] and opt[3] != opt[2]
    assert params[5] == params[4] == params[3] and opt[5] == opt[4] == opt[3]
    assert caches[5] != caches[4] != caches[3]

"""Lanes follow the mesh across real JAX processes: a job on 2 or 4 processes (CPU, one global
mesh) whose mesh interleaves the processes along `data` like a TPU mesh, killed (SIGKILL) after
a few steps and resumed onto another process count and device order, ends where an uninterrupted
single-process run ends: the per-step losses and the final parameters, optimizer state and cache
(float32, 1e-5 relative, docs/training.md; bitwise where the mesh shape and the device of every
mesh position are the same and both runs use several processes: tests/parallel/test_collectives_order.py), and every batch row read exactly the documents the reference's row
read, step by step (BST_DIST_LANE_TRACE), so no sequence was delivered twice or lost and every
cache row met its own lane's documents.

Without lanes that follow the mesh, process 0 of an interleaved 2-process mesh would feed lanes
0-3 into rows 0, 2, 4, 6, and the contiguous 4-process resume would meet those rows' caches with
other lanes' documents."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers.paths import REPO
from tests.helpers.runs import metrics_lines
from tests.helpers.tiny import write_job

CONSTANT_LR = ["--set", "train.optimizer.schedule=constant"]  # the kill and the resume share a schedule
N = 8  # steps; checkpoints every 2
INTERLEAVED = ["--set", "mesh.device_order=interleaved"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job, run_dir, procs: int, *extra, trace: str) -> list[subprocess.Popen]:
    """`procs` JAX processes of 8 // procs CPU devices each (one process: no coordinator)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // procs}", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO, BST_DIST_LANE_TRACE=trace)
    cmd = [sys.executable, "-m", "bst_dist", "train", "--no-ray", job, "--set", f"train.run_dir={run_dir}",
           *CONSTANT_LR, *extra]
    if procs == 1:
        return [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    port = free_port()
    return [subprocess.Popen([*cmd, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(procs),
                              "--process-id", str(i)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(procs)]


def wait(procs) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]


def kill_after(procs, run_dir, steps: int) -> None:
    deadline = time.time() + 600
    while len(metrics_lines(run_dir)) < steps:
        for p in procs:
            assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate(timeout=120)
        assert p.returncode == -signal.SIGKILL


def read_trace(d):
    from bst_dist.parallel.trace import read_trace as read

    return read(d)


def final_arrays(run_dir) -> dict:
    """The final checkpoint's state and cache as numpy (whatever process count wrote them)."""
    import jax
    import orbax.checkpoint as ocp

    d = os.path.join(run_dir, "checkpoints", str(N))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = {}
    with ocp.StandardCheckpointer() as ckpt:
        for item in ("state", "cache"):
            meta = ckpt.metadata(os.path.join(d, item))
            meta = getattr(meta, "item_metadata", meta)
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
            tree[item] = ckpt.restore(os.path.join(d, item), target)
    return jax.tree.map(np.asarray, tree)


def assert_exactly_once(trace) -> None:
    """The reference's own delivery: each (document, sequence) once, a document's sequences in
    order on one row, one step apart."""
    where: dict = {}
    for step in range(N):
        for row, (doc, seq) in trace[step].items():
            if doc < 0:
                continue
            assert (doc, seq) not in where, f"document {doc} sequence {seq} delivered twice"
            if seq > 0:
                assert where.get((doc, seq - 1)) == (row, step - 1), f"document {doc} jumped rows or steps"
            where[(doc, seq)] = (row, step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run (8 devices, jax's device order)."""
    d = tmp_path_factory.mktemp("ref")
    job = write_job(d / "job.yaml", train={"steps": N})
    wait(launch(job, str(d / "run"), 1, trace=str(d / "trace")))
    trace = read_trace(str(d / "trace"))
    assert sorted(trace) == list(range(N)) and all(sorted(t) == list(range(8)) for t in trace.values())
    assert_exactly_once(trace)
    return job, str(d / "run"), trace


def kill_and_resume(reference, tmp_path, first: tuple, then: tuple, at: int = 3, exact: bool = False):
    """Run `first` = (processes, extra args) until `at` steps are logged, SIGKILL it, resume with
    `then`; check it against the reference (bitwise with `exact`, else 1e-5 relative) and return
    (run_dir, the killed run's lane assignment)."""
    job, ref_dir, ref_trace = reference
    run_dir, trace = str(tmp_path / "run"), str(tmp_path / "trace")
    kill_after(launch(job, run_dir, first[0], *first[1], trace=trace), run_dir, at)
    steps = sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints")) if s.isdigit())
    assert steps, "the killed run left no checkpoint"
    with open(os.path.join(run_dir, "checkpoints", str(steps[-1]), "data", f"process_0-of-{first[0]}.json")) as f:
        killed = json.load(f)["assignment"]  # the layout the killed run recorded
    wait(launch(job, run_dir, then[0], *then[1], trace=trace))
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert 0 < summary["start_step"] < N  # it really resumed from the killed run's checkpoint
    with open(os.path.join(run_dir, "checkpoints", str(N), "data", f"process_0-of-{then[0]}.json")) as f:
        saved = json.load(f)
    # the resumed layout's assignment: each process's rows, interleaved or not, cover the batch once
    assert sorted(b for rows in saved["assignment"].values() for b in rows) == list(range(8))
    assert len(saved["assignment"]) == then[0]

    got = read_trace(trace)
    assert sorted(got) == list(range(N))
    for step in range(N):  # every row read its own lane's documents, before and after the kill
        assert got[step] == ref_trace[step], f"step {step}: rows read other documents than the reference's"
    got_losses = [json.loads(line)["loss"] for line in metrics_lines(run_dir)]
    ref_losses = [json.loads(line)["loss"] for line in metrics_lines(ref_dir)]
    assert len(got_losses) == len(ref_losses) == N
    if exact:
        assert got_losses == ref_losses
    else:
        np.testing.assert_allclose(got_losses, ref_losses, rtol=1e-5)
    mine, theirs = final_arrays(run_dir), final_arrays(ref_dir)
    import jax

    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(mine), jax.tree_util.tree_leaves(theirs)):
        if exact:
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    return run_dir, killed


def test_interleaved_two_processes_killed_then_one(reference, tmp_path):
    _, killed = kill_and_resume(reference, tmp_path, (2, INTERLEAVED), (1, []))
    assert killed == {"0": [0, 2, 4, 6], "1": [1, 3, 5, 7]}  # the killed run really interleaved


@pytest.fixture(scope="module")
def reference_two_processes(tmp_path_factory):
    """One uninterrupted run on 2 processes of 4 devices, jax's device order (mesh position i is
    device i, as on 1 process)."""
    d = tmp_path_factory.mktemp("ref2")
    job = write_job(d / "job.yaml", train={"steps": N})
    wait(launch(job, str(d / "run"), 2, trace=str(d / "trace")))
    return job, str(d / "run"), read_trace(str(d / "trace"))


@pytest.mark.slow
def test_two_processes_killed_then_four_at_the_same_positions_is_bitwise(reference_two_processes, tmp_path):
    """The mesh shape and every mesh position's device unchanged, 2 processes of 4 devices killed
    and resumed on 4 of 2: the losses, parameters, optimizer state and cache are bitwise the
    uninterrupted 2-process run's. Across processes every device is its own rank of the CPU
    collectives (gloo), so the gradient all-reduce adds in the same order whatever the process
    count; one process reduces in-process, in another order (tests/parallel/test_collectives_order.py),
    so 1 <-> P processes agree to 1e-5, not bitwise."""
    run_dir, killed = kill_and_resume(reference_two_processes, tmp_path, (2, []), (4, []), exact=True)
    assert killed == {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}  # contiguous: mesh position i is device i
    with open(os.path.join(run_dir, "checkpoints", str(N), "data", "process_0-of-4.json")) as f:
        assert json.load(f)["assignment"] == {"0": [0, 1], "1": [2, 3], "2": [4, 5], "3": [6, 7]}


@pytest.mark.slow
def test_interleaved_two_processes_killed_then_four_contiguous(reference, tmp_path):
    run_dir, killed = kill_and_resume(reference, tmp_path, (2, INTERLEAVED), (4, []))
    assert killed == {"0": [0, 2, 4, 6], "1": [1, 3, 5, 7]}
    with open(os.path.join(run_dir, "checkpoints", str(N), "data", "process_0-of-4.json")) as f:
        assert json.load(f)["assignment"] == {"0": [0, 1], "1": [2, 3], "2": [4, 5], "3": [6, 7]}


@pytest.mark.slow
def test_interleaved_two_processes_killed_then_four_interleaved(reference, tmp_path):
    run_dir, killed = kill_and_resume(reference, tmp_path, (2, INTERLEAVED), (4, INTERLEAVED))
    assert killed == {"0": [0, 2, 4, 6], "1": [1, 3, 5, 7]}
    with open(os.path.join(run_dir, "checkpoints", str(N), "data", "process_0-of-4.json")) as f:
        assert json.load(f)["assignment"] == {"0": [0, 4], "1": [1, 5], "2": [2, 6], "3": [3, 7]}


@pytest.mark.slow
def test_four_interleaved_killed_then_two_permuted(reference, tmp_path):
    perm = ["--set", "mesh.device_order=[6,1,4,3,2,5,0,7]"]  # process 0 (devices 0-3) at positions 1, 3, 4, 6
    run_dir, killed = kill_and_resume(reference, tmp_path, (4, INTERLEAVED), (2, perm))
    assert killed == {"0": [0, 4], "1": [1, 5], "2": [2, 6], "3": [3, 7]}
    with open(os.path.join(run_dir, "checkpoints", str(N), "data", "process_0-of-2.json")) as f:
        assert json.load(f)["assignment"] == {"0": [1, 3, 4, 6], "1": [0, 2, 5, 7]}

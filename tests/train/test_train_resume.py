"""Exact resume: a run killed (SIGKILL) or preempted (SIGTERM) at a random step and rerun to N
ends bitwise identical to an uninterrupted run on CPU in float32: parameters, optimizer state,
cache and the per-step loss log. The uninterrupted run is the suite's shared `tiny_reference`
(the same job, run in the test process): a `bst-dist train` subprocess and the library call
compute the same bits."""

import json
import os
import random
import signal
import time

import pytest
import yaml

from tests.helpers.runs import metrics_lines, train_subprocess
from tests.helpers.tiny import REFERENCE_JOB




def run_to_end(job, run_dir):
    p = train_subprocess(job, run_dir)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def interrupt_at(job, run_dir, sig, at_step):
    p = train_subprocess(job, run_dir)
    deadline = time.time() + 600
    while len(metrics_lines(run_dir)) < at_step:
        assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    p.send_signal(sig)
    out, _ = p.communicate(timeout=300)
    return p.returncode, out


@pytest.fixture(scope="module")
def reference(tiny_reference, tmp_path_factory):
    """(the job file, the uninterrupted run's summary, its metrics lines)."""
    run_dir, summary = tiny_reference
    job = tmp_path_factory.mktemp("ref") / "job.yaml"
    job.write_text(yaml.safe_dump(REFERENCE_JOB))
    return str(job), summary, metrics_lines(run_dir)


# SIGTERM's save-then-resume also runs through Ray in test_launch_ray.py (default suite)
@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_interrupted_run_resumes_bitwise(reference, tmp_path, sig):
    job, ref, ref_lines = reference
    run_dir = str(tmp_path / "run")
    at = random.Random(int(sig)).randint(3, 5)  # of 6 steps
    code, out = interrupt_at(job, run_dir, sig, at)
    if sig == signal.SIGTERM:
        assert code == 143, out[-2000:]  # saved, then a non-zero status for the supervisor
        assert "preempted: saved step" in out
    else:
        assert code == -signal.SIGKILL
    resumed = run_to_end(job, run_dir)
    assert resumed["start_step"] > 0  # it really resumed
    for key in ("params_digest", "opt_state_digest", "cache_digest"):
        assert resumed[key] == ref[key], key
    ref_losses = [json.loads(line)["loss"] for line in ref_lines]
    got_losses = [json.loads(line)["loss"] for line in metrics_lines(run_dir)]
    assert got_losses == ref_losses  # the per-step loss log, bitwise


def test_inspect_reports_the_finished_run(reference):
    from bst_dist.runs.inspect import format_inspection, inspect_run

    _, ref, _ = reference
    d = inspect_run(ref["run_dir"])
    assert d["steps"][-1] == 6 and not d["half_written"]
    newest = d["newest"]
    assert newest["step"] == 6 and newest["tokens_seen"] == 6 * 8 * 64
    assert newest["data"]["lanes"] == 8 and newest["data"]["step"] == 6
    assert newest["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    embed = next(a for a in newest["params"] if a["path"] == "params/embed")
    assert embed["shape"] == [50304, 32]
    assert any(a["path"].endswith("h_re") for a in newest["cache"])  # the S4D carry is in the checkpoint
    assert "newest: step 6" in format_inspection(d)

"""The README works as written. Every command line of its bash blocks is either run by a test
here, from a working directory laid out like a fresh clone, or listed with the reason it cannot
run on a CPU machine without a cluster, so a new README line must be classified; the Python
example runs as printed; relative paths give the same answers as absolute ones; a rerun of a
complete run keeps its record, and a train.steps below the checkpoint is one line."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO
from tests.helpers.tiny import write_job

README = os.path.join(REPO, "README.md")

# Run below, as written (the key is the line with its comment removed).
RUN_DEFAULT = {
    "bst-dist describe jobs/pg19_200m_bst_sh_s4.yaml",
    "bst-dist describe --resolved jobs/pg19_200m_bst_sh_s4.yaml",
}
RUN_SLOW = {
    "bst-dist train jobs/local_tiny.yaml --set train.steps=50",
    "bst-dist train jobs/local_tiny.yaml --workers 2",
    "bst-dist eval runs/local_tiny --max-batches 50 --lengths 256,1024",
    "bst-dist plot runs/local_tiny",
    "bst-dist inspect runs/local_tiny",
}
# Lines whose needs this machine lacks, and what covers them instead.
NOT_HERE = {
    "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/bst-dist train jobs/local_tiny.yaml":
        "a fresh venv: CI's own .ci/run installs the same way; the slow chain trains the same job to its end",
    "python3 -m venv .venv && .venv/bin/pip install -q -e \".[test]\" && .venv/bin/python -m pytest -n 2 -q":
        "the test command itself: .ci/run runs exactly this line",
    "bst-dist plan jobs/pg19_400m.yaml --topology v5p-64":
        "libtpu (the tpu extra) and ~10 CPU-minutes: tests/parallel/test_plan.py compiles a small job the same way",
    "bst-dist prepare-data --corpus pg19 --src /data/pg19 --out /data/pg19_gpt2":
        "a PG-19 download: tests/data/test_data_prepare.py prepares the same layout from a small folder",
    "ray job submit --working-dir . -- bst-dist train jobs/pg19_400m.yaml":
        "a GPU cluster: tests/launch/test_launch_ray.py submits this form to a local job server",
    "bst-dist submit jobs/pg19_400m.yaml --address http://HEAD:8265":
        "a cluster address: tests/launch/test_launch_ray.py submits to a local job server",
}


def readme_blocks(lang: str) -> list[str]:
    with open(README) as f:
        return re.findall(rf"```{lang}\n(.*?)```", f.read(), flags=re.S)


def command_lines() -> list[str]:
    lines = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def cli(args: list[str], cwd, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # as a user's shell has it: one CPU device
    return subprocess.run([sys.executable, "-m", "bst_dist", *args], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=timeout)


def fresh_clone(tmp_path):
    """A working directory like a clone's root: the job files, and runs/ of its own."""
    os.symlink(os.path.join(REPO, "jobs"), tmp_path / "jobs")
    return tmp_path


def test_every_command_line_is_run_or_excused():
    lines = command_lines()
    unclassified = [x for x in lines if x not in RUN_DEFAULT | RUN_SLOW | set(NOT_HERE)]
    assert not unclassified, f"README lines that no test runs or excuses: {unclassified}"
    stale = (RUN_DEFAULT | RUN_SLOW | set(NOT_HERE)) - set(lines)
    assert not stale, f"lines classified here but gone from the README: {stale}"


def test_python_example_runs_as_printed():
    (code,) = readme_blocks("python")
    code += "\nassert logits.shape == (2, tokens.shape[1], cfg.model.padded_vocab), logits.shape\nprint('ok')\n"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]


@pytest.mark.parametrize("line", sorted(RUN_DEFAULT))
def test_describe_lines_run_as_written(line, tmp_path):
    p = cli(line.split()[1:], fresh_clone(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "pg19_200m_bst_sh_s4" in p.stdout and "Traceback" not in p.stderr


def test_relative_run_dir_reruns_and_steps_below_the_checkpoint(tmp_path):
    """--no-ray with a relative run_dir (Orbax takes absolute paths only: the launcher resolves
    them); inspect answers alike for the relative and the absolute path; a rerun of the complete
    run trains nothing and keeps summary.json; train.steps below the checkpoint is one line."""
    cwd = fresh_clone(tmp_path)
    job = write_job(tmp_path / "tiny.yaml", train={"steps": 2, "run_dir": "runs/tiny", "log_every": 1},
                    checkpoint={"every": 1, "keep_last": 2}, model={"brect_layers": [], "num_layers": 2})
    p = cli(["train", "--no-ray", job], cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    assert sorted(os.listdir(run_dir / "checkpoints"))[-1] == "2"

    rel, absolute = cli(["inspect", "runs/tiny"], cwd), cli(["inspect", str(run_dir)], cwd)
    assert rel.returncode == absolute.returncode == 0, rel.stderr[-2000:]
    assert "steps [1, 2]" in rel.stdout and " 0 parameters" not in rel.stdout and "mesh None" not in rel.stdout
    assert rel.stdout.replace("runs/tiny", str(run_dir)) == absolute.stdout

    summary = (run_dir / "summary.json").read_text()
    again = cli(["train", "--no-ray", job], cwd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "tiny was already complete at step 2: nothing to train" in again.stdout
    assert (run_dir / "summary.json").read_text() == summary and len(json.loads(summary)["losses"]) == 2

    below = cli(["train", "--no-ray", job, "--set", "train.steps=1"], cwd)
    assert below.returncode == 2 and "Traceback" not in below.stderr
    (line,) = below.stderr.strip().splitlines()[-1:]
    assert "train.steps 1 is below the run's newest checkpoint, step 2" in line
    assert (run_dir / "summary.json").read_text() == summary
    assert "steps: 2" in (run_dir / "job.yaml").read_text()  # the refused rerun left job.yaml alone


@pytest.mark.slow
def test_everyday_commands_run_as_written(tmp_path):
    """The README's training chain, in its order, from a fresh clone's root: 50 steps under the
    embedded Ray, then the rest of the 200 on two CPU workers, evaluation, plots, inspection, and
    the first five minutes' `bst-dist train jobs/local_tiny.yaml` again, which finds it complete."""
    cwd = fresh_clone(tmp_path)
    order = [x for x in command_lines() if x in RUN_SLOW]
    assert order[0].startswith("bst-dist train") and len(order) == len(RUN_SLOW)
    out = {}
    for line in order:
        p = cli(line.split()[1:], cwd, timeout=1200)
        assert p.returncode == 0, f"{line}: {p.stderr[-3000:]}"
        out[line] = p
    assert "done at step 50" in out["bst-dist train jobs/local_tiny.yaml --set train.steps=50"].stdout
    assert "done at step 200" in out["bst-dist train jobs/local_tiny.yaml --workers 2"].stdout
    result = json.loads(out["bst-dist eval runs/local_tiny --max-batches 50 --lengths 256,1024"].stdout)
    assert result["step"] == 200 and [a["T"] for a in result["at_length"]] == [256, 1024]
    assert "steps [100, 200]" in out["bst-dist inspect runs/local_tiny"].stdout
    assert os.listdir(tmp_path / "runs" / "local_tiny" / "plots")
    p = cli(["train", "jobs/local_tiny.yaml"], cwd, timeout=600)
    assert p.returncode == 0 and "already complete at step 200" in p.stdout, p.stderr[-3000:]

"""`bst-dist describe --resolved JOB`: the spec with includes merged, overrides applied and every
default filled in; written to a file, it loads back to the same job."""

import glob
import json
import os
import subprocess
import sys

import pytest

from bst_dist import config

from tests.helpers import paths
from tests.helpers.paths import REPO

JOBS = sorted(glob.glob(os.path.join(paths.JOBS, "*.yaml")) + glob.glob(os.path.join(paths.JOBS, "variants", "*.yaml")))


@pytest.mark.parametrize("path", JOBS, ids=lambda p: os.path.relpath(p, REPO))
def test_the_dump_of_every_job_loads_back_to_the_same_job(tmp_path, path):
    cfg = config.load(path)
    text = config.dump(cfg)
    assert "include" not in text
    out = tmp_path / "resolved.yaml"
    out.write_text(text)
    assert config.load(out) == cfg


def test_describe_resolved_prints_the_yaml_that_loads_back(tmp_path):
    job = os.path.join(paths.JOBS, "variants", "pg19_400m_tpu_v5p.yaml")
    sets = ["--set", "train.steps=7", "--set", "train.optimizer.lr=1e-4"]
    r = subprocess.run([sys.executable, "-m", "bst_dist", "describe", "--resolved", job, *sets],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 0, r.stderr
    out = tmp_path / "resolved.yaml"
    out.write_text(r.stdout)
    got = config.load(out)
    assert got == config.load(job, ["train.steps=7", "train.optimizer.lr=1e-4"])
    assert (got.name, got.train.steps, got.train.optimizer.lr, got.ray.num_workers) == ("pg19_400m_tpu_v5p", 7, 1e-4, 8)
    r = subprocess.run([sys.executable, "-m", "bst_dist", "describe", "--resolved", "--json", job],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO})
    assert json.loads(r.stdout) == config.to_dict(config.load(job))

"""`bst-dist study`: tiny runs under one token budget, trained and evaluated through the normal job
machinery, one JSON each and a report; a rerun skips finished runs; runs of unequal size are
refused before anything trains. Slow cases: two runs, one of which lost its last checkpoint and
its JSON and resumes from the checkpoint before, ending where it ended; and the CLI killed
mid-study and rerun."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from bst_dist.runs.describe import count_params
from bst_dist.study import runner, spec
from bst_dist.study.spec import StudyError

from tests.helpers.paths import REPO
from tests.helpers.runs import checkpoint_steps
from tests.helpers.tiny import write_job

MODEL = {"num_layers": 2, "bst_layers": [], "brect_layers": []}


def write_study(tmp_path, runs=None, **top) -> str:
    job = write_job(tmp_path / "tiny.yaml", model=MODEL, checkpoint={"every": 2, "keep_last": 3})
    study = {"name": "tiny", "tokens": 4 * 8 * 64, "out": str(tmp_path / "out"),
             "eval": {"split": "validation", "max_batches": 1, "lengths": [32], "max_docs": 2, "length_tokens": 256},
             "runs": runs or [{"name": "a", "label": "Block", "job": os.path.basename(job), "set": ["train.seed=0"]},
                              {"name": "b", "label": "Block, no carry", "job": "tiny.yaml",
                               "set": ["train.seed=1", "train.carry_cache=false"]}], **top}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return str(path)


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_one_run_json_report_and_rerun_skips(tmp_path):
    """The default-suite case: one 2-step run, evaluated without the at-length part."""
    path = write_study(tmp_path, tokens=2 * 8 * 64,
                       eval={"split": "validation", "max_batches": 1, "lengths": [], "max_docs": 1},
                       runs=[{"name": "a", "label": "Block", "job": "tiny.yaml"}])
    study = spec.load(path)
    runner.run_study(study, no_ray=True)
    r = _read(runner.result_path(study, "a"))
    assert r["format"] == "bst_dist.study_run/1" and r["tokens"] == 1024 and r["steps"] == 2
    assert r["train"]["steps_logged"] == 2 and r["train"]["start_step"] == 0 and r["eval"]["step"] == 2
    assert r["params"]["non_embedding"] == count_params(study.runs[0].cfg.model)["non_embedding"]
    assert r["eval"]["fresh"]["tokens"] == r["eval"]["carried"]["tokens"] > 0
    assert r["config_digest"] == spec.config_digest(study.runs[0].cfg)
    assert "| a | Block |" in open(os.path.join(study.out, "report.md")).read()
    assert os.path.getsize(os.path.join(study.out, "plots", "learning_curves.png")) > 1000
    stamp = os.stat(runner.result_path(study, "a")).st_mtime_ns
    runner.run_study(study, no_ray=True)  # the JSON is the "done" mark: nothing trains again
    assert os.stat(runner.result_path(study, "a")).st_mtime_ns == stamp


@pytest.mark.slow
def test_study_trains_evaluates_reports_and_resumes(tmp_path):
    study = spec.load(write_study(tmp_path))
    assert [r.cfg.train.steps for r in study.runs] == [4, 4]  # 2048 tokens / (8 x 64)
    runner.run_study(study, no_ray=True)
    res = {n: _read(runner.result_path(study, n)) for n in ("a", "b")}
    for name, r in res.items():
        assert r["tokens"] == 2048 and r["steps"] == 4 and r["train"]["steps_logged"] == 4
        assert r["params"]["non_embedding"] == count_params(study.runs[0].cfg.model)["non_embedding"]
        assert r["train"]["final_loss"] > 0 and r["device"]["platform"] == "cpu"
        assert r["eval"]["fresh"]["tokens"] > 0 and r["eval"]["at_length"][0]["T"] == 32
        assert r["eval"]["step"] == 4
    assert res["a"]["config_digest"] != res["b"]["config_digest"]
    assert res["b"]["config"]["train"]["carry_cache"] is False
    report = open(os.path.join(study.out, "report.md")).read()
    assert "| a | Block |" in report and "| b | Block, no carry |" in report and "spread 0.0%" in report
    for png in ("learning_curves.png", "length_curves.png", "position_buckets.png"):
        assert os.path.getsize(os.path.join(study.out, "plots", png)) > 1000

    # a rerun trains nothing: the JSONs are the "done" marks
    stamps = {n: os.stat(runner.result_path(study, n)).st_mtime_ns for n in ("a", "b")}
    runner.run_study(study, no_ray=True)
    assert {n: os.stat(runner.result_path(study, n)).st_mtime_ns for n in ("a", "b")} == stamps

    # b as if killed after its step-2 checkpoint: it resumes there and ends where it ended
    b_dir = os.path.join(study.out, "runs", "b")
    assert checkpoint_steps(b_dir) == [2, 4]
    shutil.rmtree(os.path.join(b_dir, "checkpoints", "4"))
    os.remove(runner.result_path(study, "b"))
    runner.run_study(study, no_ray=True)
    again = _read(runner.result_path(study, "b"))
    assert again["train"]["start_step"] == 2 and again["train"]["resumed"]
    assert again["train"]["final_loss"] == res["b"]["train"]["final_loss"]
    assert again["eval"]["fresh"]["loss"] == pytest.approx(res["b"]["eval"]["fresh"]["loss"], rel=1e-6)
    assert os.stat(runner.result_path(study, "a")).st_mtime_ns == stamps["a"]


def test_unequal_params_refused_before_training(tmp_path):
    path = write_study(tmp_path, runs=[{"name": "small", "job": "tiny.yaml"},
                                       {"name": "big", "job": "tiny.yaml", "set": ["model.mlp_dim=256"]}])
    study = spec.load(path)
    with pytest.raises(StudyError, match=r"param_tolerance: non-embedding parameters differ by .*small.*big"):
        runner.run_study(study, no_ray=True)
    assert not os.path.exists(os.path.join(study.out, "runs"))
    # with no tolerance the spread is only reported
    loose = dataclasses.replace(study, param_tolerance=None)
    check = runner.check_params(loose, runner.param_counts(loose))
    assert check["spread"] > 0.05 and check["within_tolerance"] and (check["smallest"], check["largest"]) == ("small", "big")


@pytest.mark.parametrize("top, message", [
    ({"tokens": 1000}, "tokens: 1,000 is not a positive multiple of run a's tokens per step"),
    ({"colour": 1}, "colour: unknown key"),
    ({"eval": {"lengths": [0]}}, "eval.lengths: expected a list of positive integers"),
    ({"param_tolerance": 2}, "param_tolerance: expected a fraction in [0, 1) or null"),
    ({"runs": [{"name": "a", "job": "nope.yaml"}]}, "runs[0].job:"),
    ({"runs": [{"name": "a", "job": "tiny.yaml"}, {"name": "a", "job": "tiny.yaml"}]}, "'a' is used twice"),
])
def test_bad_study_file(tmp_path, top, message):
    with pytest.raises(StudyError) as e:
        spec.load(write_study(tmp_path, **top))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_study_file_is_one_line(tmp_path):
    path = write_study(tmp_path, tokens=1000)
    proc = subprocess.run([sys.executable, "-m", "bst_dist", "study", path, "--no-ray"], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "is not a positive multiple" in proc.stderr


def test_only_names_a_run(tmp_path):
    study = spec.load(write_study(tmp_path))
    assert [r.name for r in study.select("b")] == ["b"]
    with pytest.raises(StudyError, match="--only c: no such run"):
        study.select("a,c")


@pytest.mark.slow
def test_cli_killed_mid_study_resumes(tmp_path):
    path = write_study(tmp_path, tokens=8 * 8 * 64)
    out = str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cmd = [sys.executable, "-m", "bst_dist", "study", path, "--no-ray"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    b_dir = os.path.join(out, "runs", "b")
    deadline = time.time() + 600
    while not checkpoint_steps(b_dir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the study ended before b's first checkpoint: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    a_json = os.path.join(out, "results", "a.json")
    assert os.path.exists(a_json) and not os.path.exists(os.path.join(out, "results", "b.json"))
    stamp = os.stat(a_json).st_mtime_ns
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    b = _read(os.path.join(out, "results", "b.json"))
    assert b["train"]["resumed"] and b["train"]["start_step"] >= 2 and b["train"]["steps_logged"] == 8
    assert os.stat(a_json).st_mtime_ns == stamp

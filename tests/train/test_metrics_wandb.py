"""The Weights & Biases logger (train.loggers: [..., wandb]) on a real tiny training run, in
wandb's offline mode: the run's .wandb file, read back record by record, holds the loss of every
logged step, the same numbers as metrics.jsonl. A job asking for wandb where it is not
installed is one line naming the extra."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO
from tests.helpers.runs import metrics_lines, train_in_process
from tests.helpers.tiny import job_dict, write_job

wandb = pytest.importorskip("wandb")


def read_wandb_history(path: str, kinds: list | None = None) -> list[dict]:
    """The history rows of a .wandb file: wandb's record log (LevelDB's log format: a 7-byte
    header, then 32 KiB blocks of chunks `crc32 u32, length u16, type u8, data`; type 1 a whole
    record, 2/3/4 its first, middle and last pieces), each record a `wandb_internal.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    rows = []
    for raw in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if kinds is not None:  # every record's type, for a failure message
            kinds.append(rec.WhichOneof("record_type"))
        if rec.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows


def offline(monkeypatch, tmp_path) -> str:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    os.makedirs(tmp_path / "wandb")
    return str(tmp_path / "wandb")


def the_wandb_file(wandb_dir) -> str:
    files = glob.glob(os.path.join(str(wandb_dir), "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def test_the_logger_sends_train_and_eval_scalars_to_wandb_at_their_steps(tmp_path, monkeypatch):
    """The chief's MetricsLogger alone (no training): what it logs is what the .wandb file holds;
    a NaN loss (a skipped step) is left out, not sent as a number."""
    from bst_dist.config import WandbConfig
    from bst_dist.train.metrics import MetricsLogger

    wandb_dir = offline(monkeypatch, tmp_path)
    run_dir = tmp_path / "run"
    with MetricsLogger(str(run_dir), is_chief=True, total_steps=3, log_every=1, tty=False, stream=open(os.devnull, "w"),
                       loggers=("jsonl", "wandb"), wandb=WandbConfig(tags=("t",)), job_name="tiny") as logger:
        logger.log(1, {"loss": 2.0, "skipped": 0})
        logger.log(2, {"loss": float("nan"), "skipped": 1})
        logger.log(3, {"loss": 1.5, "skipped": 0})
        logger.log_eval(3, {"eval_loss": 1.75})
    kinds: list = []
    history = read_wandb_history(the_wandb_file(wandb_dir), kinds)
    assert [row["_step"] for row in history] == [1, 2, 3], kinds
    assert [row.get("train/loss") for row in history] == [2.0, None, 1.5]
    assert [row["train/skipped"] for row in history] == [0, 1, 0]
    assert history[2]["eval/eval_loss"] == 1.75
    assert not (run_dir / "tb").exists()  # tensorboard not in the loggers
    # A non-chief process opens no W&B run.
    MetricsLogger(str(tmp_path / "other"), is_chief=False, total_steps=3, log_every=1,
                  loggers=("jsonl", "wandb")).close()
    assert not (tmp_path / "other").exists()


@pytest.mark.slow  # one tiny training run: ~75 s on 2 shared cores
def test_an_offline_wandb_run_holds_the_loss_of_every_step(tmp_path, monkeypatch):
    wandb_dir = offline(monkeypatch, tmp_path)
    run_dir = tmp_path / "run"
    job = job_dict(train={"steps": 4, "loggers": ["jsonl", "tensorboard", "wandb"],
                          "wandb": {"project": "bst-test", "tags": ["tiny"]}},
                   checkpoint={"every": 100})
    train_in_process(job, run_dir)

    path = the_wandb_file(wandb_dir)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert path.endswith(f"run-{run_id}.wandb")  # a resume finds the same W&B run
    history = read_wandb_history(path)
    jsonl = [json.loads(line) for line in metrics_lines(str(run_dir))]
    assert [row["_step"] for row in history] == [r["step"] for r in jsonl] == [1, 2, 3, 4]
    assert [row["train/loss"] for row in history] == [r["loss"] for r in jsonl]
    assert all(row["train/skipped"] == 0 and row["train/tokens_seen"] > 0 for row in history)
    assert os.path.isdir(run_dir / "tb")  # TensorBoard still written beside it


def test_without_tensorboard_no_event_files_are_written(tmp_path):
    from bst_dist.train.metrics import MetricsLogger

    with MetricsLogger(str(tmp_path), is_chief=True, total_steps=2, log_every=1, tty=False,
                       stream=open(os.devnull, "w"), loggers=("jsonl",)) as logger:
        logger.log(1, {"loss": 2.0})
        logger.log_eval(1, {"eval_loss": 2.5})
    assert sorted(os.listdir(tmp_path)) == ["eval.jsonl", "metrics.jsonl"]


def test_wandb_not_installed_is_one_line_naming_the_extra(tmp_path):
    job = write_job(tmp_path / "job.yaml", train={**job_dict()["train"], "loggers": ["jsonl", "wandb"]})
    # wandb made unimportable for this one process, as in an environment without it
    code = ("import sys; sys.modules['wandb'] = None; from bst_dist.commands.main import main; "
            f"sys.exit(main(['train', '--no-ray', {job!r}, '--set', 'train.run_dir={tmp_path / 'run'}']))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert lines == ["bst-dist train: error: train.loggers: wandb is not installed; install the extra: "
                     "pip install 'bst-dist[wandb]'"], p.stderr
    assert not (tmp_path / "run").exists()

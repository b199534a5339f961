"""bst_dist.storage against a real GCS emulator (gcp-storage-emulator) on 127.0.0.1, started and
stopped here. Default suite: file operations, the mirror that keeps a growing file readable on
the bucket, and the one-line error for a missing bucket. Slow: prepare-data to gs://, a training
run with its run directory and checkpoints on gs:// SIGKILLed mid-run, resumed from gs://, and
equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

from bst_dist import storage  # noqa: E402

from tests.helpers.paths import LOCAL_TINY as JOB, REPO
from tests.helpers.tiny import tiny_sets

BUCKET = "bst-test"
# local_tiny with the tiny model in two layers, [block, bst]
TINY = [*tiny_sets(num_layers=2, brect_layers=[]), "train.steps=6", "train.global_batch_size=8",
        "train.log_every=1", "checkpoint.every=2", "checkpoint.async_save=false"]


# gcp-storage-emulator, with the one header it leaves out: tensorstore (Orbax's array writer)
# reads an object's generation from `x-goog-generation` on every media download, as real GCS
# sends it, and refuses a response without it ("Malformed StorageGeneration"). The handler is
# wrapped before the server module builds its routes from it.
EMULATOR = r"""
import sys
from gcp_storage_emulator.handlers import objects

_download = objects.download

def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except Exception:
        pass  # a 404: no object, no generation

objects.download = download
from gcp_storage_emulator.__main__ import main

main(sys.argv[1:])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulator's URL; STORAGE_EMULATOR_HOST (and what it implies) set in this process."""
    port = _free_port()
    data = tmp_path_factory.mktemp("gcs")
    log_path = data.parent / f"{data.name}.log"
    log = open(log_path, "wb")  # a file, not a pipe: a full pipe would block the (single-threaded) server
    p = subprocess.Popen([sys.executable, "-c", EMULATOR, "-d", str(data), "start", "--host", "127.0.0.1",
                          "--port", str(port), "--default-bucket", BUCKET, "-q"], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert p.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.1)
    saved = dict(os.environ)
    os.environ["STORAGE_EMULATOR_HOST"] = url
    storage.configure()
    try:
        yield url
    finally:
        os.environ.clear()
        os.environ.update(saved)
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()


def test_settings_derive_every_client_from_one_variable():
    env = {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}
    storage.configure(env)
    assert env["TENSORSTORE_GCS_HTTP_URL"] == "http://127.0.0.1:9"  # Orbax's arrays (tensorstore)
    assert env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false" and env["GOOGLE_AUTH_TOKEN_FOR_TESTING"]
    kept = {"STORAGE_EMULATOR_HOST": "127.0.0.1:9", "TENSORSTORE_GCS_HTTP_URL": "http://elsewhere"}
    storage.configure(kept)
    assert kept["TENSORSTORE_GCS_HTTP_URL"] == "http://elsewhere"  # a value already set wins
    none = {}
    storage.configure(none)
    assert none == {}  # real GCS: the clients' own defaults


def test_file_operations_and_trees_on_the_bucket(emulator, tmp_path):
    root = f"gs://{BUCKET}/ops-{os.getpid()}"
    storage.write_text(storage.join(root, "a", "x.txt"), "hello")
    assert storage.read_text(f"{root}/a/x.txt") == "hello" and storage.exists(f"{root}/a/x.txt")
    assert storage.isdir(f"{root}/a") and storage.listdir(root) == ["a"]
    assert not storage.exists(f"{root}/nothing") and storage.listdir(f"{root}/nothing") == []
    local = tmp_path / "tree"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "b.bin").write_bytes(bytes(range(256)))
    (local / "manifest.json").write_text("{}")
    storage.upload_tree(str(local), f"{root}/tree", last=("manifest.json",))
    storage.download_tree(f"{root}/tree", str(tmp_path / "back"))
    assert (tmp_path / "back" / "sub" / "b.bin").read_bytes() == bytes(range(256))
    assert (tmp_path / "back" / "manifest.json").read_text() == "{}"
    from data_pipelines import fs  # the corpus readers (prepare-data --src gs://...)

    assert fs.list_files(f"{root}/tree", (".bin",)) == [("sub/b.bin", 256)]
    assert fs.is_dir(f"{root}/tree") and fs.read_bytes(f"{root}/tree/sub/b.bin") == bytes(range(256))


def test_a_growing_file_is_readable_on_the_bucket_after_each_sync(emulator):
    remote = f"gs://{BUCKET}/mirror-{os.getpid()}/run"
    m = storage.Mirror(remote, pull=("metrics.jsonl",))
    path = os.path.join(m.local, "metrics.jsonl")
    for step in (1, 2):
        with open(path, "a") as f:
            f.write(json.dumps({"step": step}) + "\n")
        m.sync()
        lines = storage.read_text(f"{remote}/metrics.jsonl").splitlines()
        assert [json.loads(x)["step"] for x in lines] == list(range(1, step + 1))
    m.close()
    again = storage.Mirror(remote, pull=("metrics.jsonl",))  # a resumed run continues the file
    with open(os.path.join(again.local, "metrics.jsonl")) as f:
        assert len(f.read().splitlines()) == 2
    again.close()


def test_a_missing_bucket_is_one_line_naming_it(emulator, tmp_path):
    with pytest.raises(storage.BucketMissing, match=r"bucket gs://no-such-bucket does not exist") as e:
        storage.check_bucket("gs://no-such-bucket/runs/x", "train.run_dir")
    assert "\n" not in str(e.value) and str(e.value).startswith("train.run_dir: gs://no-such-bucket/runs/x")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("some text\n")
    p = subprocess.run([sys.executable, "-m", "bst_dist", "prepare-data", "--corpus", "text", "--src",
                        str(tmp_path / "src"), "--out", "gs://no-such-bucket/prep", "--workers", "1", "--no-progress"],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no-such-bucket" in lines[0] and "does not exist" in lines[0], p.stderr[-2000:]


# ---- end to end (slow) ---------------------------------------------------------------------------

DRIVER = r"""
import json, os, sys
from bst_dist import config, launch

overrides, kill_at, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cfg = config.load(sys.argv[4], overrides)

def train_fn(cfg, *, report=None, stop=None):
    from bst_dist.train.loop import train

    def report_and_maybe_die(metrics):
        if report is not None:
            report(metrics)
        if metrics["step"] == kill_at:  # the step-4 checkpoint is written (synchronous saves)
            os.kill(os.getpid(), 9)

    return train(cfg, report=report_and_maybe_die, stop=stop)

summary = launch.train(cfg, no_ray=True, train_fn=train_fn)
with open(out, "w") as f:
    json.dump(summary, f)
"""


def _train(overrides, out, kill_at=0):
    return subprocess.run([sys.executable, "-c", DRIVER, json.dumps(overrides), str(kill_at), str(out), JOB],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                          timeout=900)


def _write_corpus(folder, docs=24, words=400, seed=0):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(300)]
    folder.mkdir(parents=True)
    for i in range(docs):
        (folder / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(words)) + "\n")


@pytest.mark.slow
def test_prepare_train_kill_resume_on_the_bucket_equals_an_uninterrupted_run(emulator, tmp_path):
    _write_corpus(tmp_path / "corpus")
    prep = f"gs://{BUCKET}/prep-{os.getpid()}"
    p = subprocess.run([sys.executable, "-m", "bst_dist", "prepare-data", "--corpus", "text", "--src",
                        str(tmp_path / "corpus"), "--out", prep, "--num-shards", "1", "--workers", "1",
                        "--no-progress"], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert storage.exists(f"{prep}/manifest.json") and storage.listdir(f"{prep}/shards")

    base = [*TINY, f"data.path={prep}"]
    ref_dir, run_dir = f"gs://{BUCKET}/runs-{os.getpid()}/ref", f"gs://{BUCKET}/runs-{os.getpid()}/killed"
    ref = _train([*base, f"train.run_dir={ref_dir}"], tmp_path / "ref.json")
    assert ref.returncode == 0, ref.stderr[-3000:]

    killed = _train([*base, f"train.run_dir={run_dir}"], tmp_path / "killed.json", kill_at=5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert storage.listdir(f"{run_dir}/checkpoints")[:2] == ["2", "4"]  # the checkpoints are on the bucket
    assert storage.exists(f"{run_dir}/metrics.jsonl")  # readable while the run was going (first sync)

    resumed = _train([*base, f"train.run_dir={run_dir}"], tmp_path / "resumed.json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = json.loads((tmp_path / "ref.json").read_text()), json.loads((tmp_path / "resumed.json").read_text())
    assert b["start_step"] == 4 and b["params_digest"] == a["params_digest"]
    assert b["losses"] == pytest.approx(a["losses"][4:], rel=1e-6)
    steps = [json.loads(x)["step"] for x in storage.read_text(f"{run_dir}/metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's step 5 was dropped on resume, then rewritten
    assert json.loads(storage.read_text(f"{run_dir}/summary.json"))["params_digest"] == a["params_digest"]
    assert "train" in storage.read_text(f"{run_dir}/job.yaml") and storage.listdir(f"{run_dir}/tb")

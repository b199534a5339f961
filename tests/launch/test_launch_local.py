"""The launch pieces that need no training: the embedded head binds 127.0.0.1 only and stop()
leaves nothing behind; the job's `ray:` section -> Ray Train configs; addresses, paths, the
submission's runtime_env and entrypoint; the SIGTERM bridge; failure messages."""

from __future__ import annotations

import os
import signal
import time

import pytest

from bst_dist import config, launch
from bst_dist.config import ConfigError
from bst_dist.launch import submit
from bst_dist.launch.ray_trainer import DEVICE_COUNT_FLAG, resources_per_worker, worker_env

from tests.helpers.paths import JOBS, LOCAL_TINY as TINY, REPO



def _group_processes(pgid: int):
    import psutil

    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def test_embedded_head_listens_on_loopback_only_and_stops_cleanly():
    import psutil

    from bst_dist.launch.local import LocalRay

    head = LocalRay(num_cpus=1, dashboard=True).start()
    pgid = head.proc.pid
    try:
        time.sleep(2)  # agents and prestarted workers come up after the GCS
        listening = []
        for p in _group_processes(pgid):
            try:
                conns = p.net_connections(kind="inet")
            except psutil.Error:
                continue
            listening += [(p.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
        names = {n for n, _, _ in listening}
        assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), listening
        exposed = [x for x in listening if x[1] not in ("127.0.0.1", "::ffff:127.0.0.1")]
        assert not exposed, f"listening beyond loopback: {exposed}"
    finally:
        head.stop()
    deadline = time.monotonic() + 10
    while _group_processes(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_processes(pgid)


def test_cpu_workers_get_fake_devices_and_cpu_platform():
    cfg = launch.with_cpu_workers(config.load(TINY, ["ray.cpu_devices_per_worker=4"]), 2)
    assert (cfg.ray.num_workers, cfg.ray.use_gpu, cfg.ray.resources_per_worker) == (2, False, {"CPU": 1})
    env = worker_env(cfg)
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"].split().count(f"{DEVICE_COUNT_FLAG}=4") == 1
    assert f"{DEVICE_COUNT_FLAG}=8" not in env["XLA_FLAGS"]  # the test process's own count is replaced


def test_gpu_and_tpu_sections_become_ray_train_configs():
    pytest.importorskip("ray")
    from bst_dist.launch.ray_trainer import run_config, scaling_config

    gpu = config.load(os.path.join(JOBS, "pg19_200m_bst_sh_s4.yaml"))
    sc = scaling_config(gpu.ray)
    assert (sc.num_workers, sc.use_gpu, sc.placement_strategy) == (2, True, "STRICT_SPREAD")
    assert sc.resources_per_worker["GPU"] == 8
    assert "XLA_FLAGS" not in worker_env(gpu) and "JAX_PLATFORMS" not in worker_env(gpu)
    assert resources_per_worker(gpu.ray)["GPU"] == 8
    rc = run_config(gpu)
    assert rc.failure_config.max_failures == 3 and rc.worker_runtime_env["env_vars"]["NCCL_DEBUG"] == "WARN"
    tpu = config.load(os.path.join(JOBS, "variants", "pg19_400m_tpu_v5p.yaml"))
    sc = scaling_config(tpu.ray)
    assert (sc.use_tpu, sc.topology, sc.accelerator_type, sc.num_workers) == (True, "2x4x4", "TPU-V5P", 8)
    with pytest.raises(ValueError, match="multiple of 8"):  # Ray's own check: whole slices only
        scaling_config(config.load(os.path.join(JOBS, "variants", "pg19_400m_tpu_v5p.yaml"),
                                   ["ray.num_workers=6"]).ray)


def test_ray_section_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^ray\.topology: TPU jobs with num_workers > 1"):
        config.load(TINY, ["ray.use_tpu=true", "ray.num_workers=4", "ray.resources_per_worker={TPU: 4}"])
    with pytest.raises(ConfigError, match=r"^ray\.resources_per_worker\.TPU: set ray\.use_tpu"):
        config.load(TINY, ["ray.resources_per_worker={TPU: 4}"])
    with pytest.raises(ConfigError, match=r"^ray\.address: .* dashboard"):
        config.load(TINY, ["ray.address=http://10.0.0.1:8265"])
    with pytest.raises(ConfigError, match=r"^ray\.placement_strategy"):
        config.load(TINY, ["ray.placement_strategy=ANYWHERE"])


def test_address_precedence(monkeypatch):
    cfg = config.load(TINY, ["ray.address=10.0.0.3:6379"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert launch.resolve_address(None, config.load(TINY)) is None  # -> embedded local Ray
    assert launch.resolve_address(None, cfg) == "10.0.0.3:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert launch.resolve_address(None, cfg) == "10.0.0.2:6379"
    assert launch.resolve_address("10.0.0.1:6379", cfg) == "10.0.0.1:6379"
    with pytest.raises(ConfigError, match=r"^--address: .*dashboard .*bst-dist submit"):
        launch.resolve_address("http://10.0.0.1:8265", cfg)


def test_relative_paths_are_resolved_where_the_job_is_launched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = launch.absolute_paths(config.load(TINY, ["train.run_dir=runs/x", "checkpoint.dir=gs://b/x"]))
    assert cfg.train.run_dir == str(tmp_path / "runs" / "x")
    assert cfg.checkpoint.dir == "gs://b/x"


def test_submission_entrypoint_runtime_env_and_resources(tmp_path):
    cfg = config.load(os.path.join(JOBS, "pg19_200m_bst_sh_s4.yaml"))
    env = submit.job_runtime_env(cfg, REPO)
    assert env["working_dir"] == REPO and ".git" in env["excludes"] and "runs/" in env["excludes"]
    assert env["env_vars"]["BST_DIST_CACHE"] == "/mnt/nfs/bst-dist/cache"
    job = submit.job_path_in(os.path.join(JOBS, "pg19_200m_bst_sh_s4.yaml"), REPO)
    assert job == "jobs/pg19_200m_bst_sh_s4.yaml"
    ep = submit.entrypoint(job, ["train.steps=10", "train.run_dir=/x y"])
    assert ep == ("python -m bst_dist train jobs/pg19_200m_bst_sh_s4.yaml "
                  "--set train.steps=10 --set 'train.run_dir=/x y'")
    res = config.load(TINY, ["ray.entrypoint_resources={CPU: 1, memory: 2000000000, ssd: 1}"])
    assert submit.entrypoint_resources(res) == {
        "entrypoint_num_cpus": 1, "entrypoint_memory": 2_000_000_000,
        "entrypoint_resources": {"ssd": 1.0, "node:__internal_head__": 0.001}}  # the driver stays on the head
    assert submit.entrypoint_resources(config.load(TINY, ["ray.entrypoint_resources={}"])) == {}
    with pytest.raises(ConfigError, match="inside the working dir"):
        submit.job_path_in(TINY, str(tmp_path))


def test_sigterm_sets_the_stop_event_only_while_training():
    from bst_dist.launch import worker

    calls = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
    try:
        stop = worker.install_sigterm_bridge()
        worker._ACTIVE.set()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.is_set() and calls == []  # training: a stop request, not an exit
        worker._ACTIVE.clear()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert calls == [signal.SIGTERM]  # idle: the previous handler (Ray's exit) runs
    finally:
        worker._ACTIVE.clear()
        signal.signal(signal.SIGTERM, previous)


def test_failure_message_names_each_rank_and_the_retry_budget():
    ray = pytest.importorskip("ray")
    from ray.train import WorkerGroupError

    from bst_dist.launch.ray_trainer import describe_failure

    err = WorkerGroupError("boom", {0: RuntimeError("first line\nmore"), 1: ray.exceptions.RayActorError()})
    msg = describe_failure(err, 2)
    assert msg.startswith("training failed after 2 restart(s) (ray.max_failures=2): ")
    assert "rank 0: first line" in msg and "rank 1: worker process died" in msg
    assert "\n" not in msg

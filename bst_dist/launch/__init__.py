"""Launching a job: under Ray Train (an embedded local Ray, or an existing cluster) or in-process.

    bst_dist.launch.train(cfg, address=None, workers=None, no_ray=False, train_fn=None) -> summary

is what `bst-dist train` calls, and what the tests call. docs/launch.md explains the paths:
  * no address anywhere      -> start a loopback-only Ray head (local.py), run, stop it;
  * --address / $RAY_ADDRESS / ray.address -> connect to that cluster (inside a submitted job
    the job already carries its runtime_env; from outside, the YAML's runtime_env is applied);
  * already connected (ray.init was called by the caller) -> use that connection;
  * no_ray                   -> call the training function in this process (debugging).
`train_fn(cfg, *, report, [stop]) -> dict` defaults to bst_dist.runs.job.train_job.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any, Callable, Optional

from bst_dist.config import ConfigError, JobConfig

log = logging.getLogger("bst_dist.launch")

JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted job's entrypoint


def in_submitted_job() -> bool:
    return JOB_ENV_VAR in os.environ


def with_cpu_workers(cfg: JobConfig, workers: int) -> JobConfig:
    """`--workers N`: N CPU workers (each `ray.cpu_devices_per_worker` fake devices)."""
    if workers <= 0:
        raise ConfigError(f"--workers: must be > 0, got {workers}")
    ray_cfg = dataclasses.replace(cfg.ray, num_workers=workers, use_gpu=False, use_tpu=False, topology=None,
                                  accelerator_type=None, resources_per_worker={"CPU": 1})
    return dataclasses.replace(cfg, ray=ray_cfg)


def _absolute(path: Optional[str]) -> Optional[str]:
    if path is None or "://" in path or os.path.isabs(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """Relative paths resolved here, in the launching process: Ray workers run in other
    directories (the working_dir copy of a submitted job, or Ray's own cwd)."""
    if in_submitted_job() and not os.path.isabs(cfg.train.run_dir) and "://" not in cfg.train.run_dir:
        log.warning("train.run_dir %r is relative: inside a submitted job it resolves into the job's working-dir "
                    "copy, which a later run will not see; use an absolute path on shared storage", cfg.train.run_dir)
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, run_dir=_absolute(cfg.train.run_dir)),
        checkpoint=dataclasses.replace(cfg.checkpoint, dir=_absolute(cfg.checkpoint.dir)),
        data=dataclasses.replace(cfg.data, src=_absolute(cfg.data.src), path=_absolute(cfg.data.path),
                                 cache_dir=_absolute(cfg.data.cache_dir)),
        ray=dataclasses.replace(cfg.ray, storage_path=_absolute(cfg.ray.storage_path)))


def resolve_address(address: Optional[str], cfg: JobConfig) -> Optional[str]:
    """--address, else $RAY_ADDRESS, else ray.address; None means the embedded local Ray."""
    addr = address or os.environ.get("RAY_ADDRESS") or cfg.ray.address
    if addr and addr.startswith(("http://", "https://")):
        where = "--address" if address else "$RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "ray.address"
        raise ConfigError(f"{where}: {addr!r} is a dashboard (job submission) URL; `bst-dist train` needs the GCS "
                          "address (host:6379, or auto); to submit through the dashboard use `bst-dist submit`")
    return addr or None


def driver_runtime_env(cfg: JobConfig) -> dict:
    """The YAML's runtime_env for a driver outside the cluster (working_dir resolved here)."""
    env = dict(cfg.ray.runtime_env)
    wd = env.get("working_dir")
    if isinstance(wd, str) and "://" not in wd:
        env["working_dir"] = os.path.abspath(wd)
    return env


def _enable_token_auth_if_given() -> None:
    """A token in the environment means the cluster uses token auth (Ray does not infer it for
    an explicit address)."""
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        from bst_dist.launch.local import refresh_auth

        os.environ["RAY_AUTH_MODE"] = "token"
        refresh_auth()


def _listens_on_loopback_only(address: str) -> bool:
    """A head bound to 127.0.0.1 only (like the embedded one) needs a single-node driver; a usual
    head (node IP routable, GCS on all interfaces) needs a usual driver, even via 127.0.0.1."""
    import socket

    from ray._private.services import node_ip_address_from_perspective

    host_port = address.split("://", 1)[-1]
    if ":" not in host_port:
        return False
    port = int(host_port.rsplit(":", 1)[1])
    try:
        with socket.create_connection((node_ip_address_from_perspective(), port), timeout=2):
            return False
    except OSError:
        return True


def connect(address: str, cfg: JobConfig) -> None:
    import ray

    from bst_dist.launch.local import is_loopback, use_loopback_driver

    _enable_token_auth_if_given()
    kwargs: dict = {}
    if is_loopback(address) and _listens_on_loopback_only(address):
        use_loopback_driver()
    elif not in_submitted_job() and cfg.ray.runtime_env:
        kwargs["runtime_env"] = driver_runtime_env(cfg)
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise ConfigError(f"ray address {address!r}: cannot connect ({str(e).splitlines()[0]}); if the cluster "
                          "uses token auth, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token)") from None


def check_resources(cfg: JobConfig) -> None:
    """On a fixed-size cluster (the embedded one), refuse a job it can never schedule."""
    import ray

    from bst_dist.launch.ray_trainer import resources_per_worker

    have = ray.cluster_resources()
    per = resources_per_worker(cfg.ray)
    n = cfg.ray.num_workers
    short = {k: v * n for k, v in per.items() if v * n > have.get(k, 0.0)}
    if short:
        raise ConfigError(
            f"ray: the job asks for {n} worker(s) x {per} but the local Ray has "
            f"{ {k: v for k, v in have.items() if k in ('CPU', 'GPU', 'TPU')} }; run it on a cluster "
            "(--address, bst-dist submit) or as CPU workers (--workers N)")


def local_cpus(cfg: JobConfig) -> int:
    from bst_dist.launch.ray_trainer import resources_per_worker

    need = cfg.ray.num_workers * resources_per_worker(cfg.ray).get("CPU", 0.0)
    return max(os.cpu_count() or 1, int(need + 0.999))


def _check_loggers(cfg: JobConfig) -> None:
    """A logger whose package is missing is one line before anything starts."""
    if "wandb" in cfg.train.loggers:
        from bst_dist.train.wandb_run import check_installed

        check_installed()


def run_in_process(cfg: JobConfig, train_fn: Optional[Callable[..., Any]] = None) -> Any:
    """--no-ray: the training function in this process, with the whole global mesh here."""
    from bst_dist.launch.ray_trainer import cpu_xla_flags, platform

    r = cfg.ray
    if platform(r) == "cpu" and r.cpu_devices_per_worker and "jax" not in sys.modules:
        # The same global mesh as the Ray run: num_workers x cpu_devices_per_worker devices.
        os.environ["XLA_FLAGS"] = cpu_xla_flags(r.num_workers * r.cpu_devices_per_worker, os.environ.get("XLA_FLAGS", ""))
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if train_fn is None:
        from bst_dist.launch.worker import default_train_fn

        train_fn = default_train_fn()
    return train_fn(cfg)


def train(cfg: JobConfig, *, address: Optional[str] = None, workers: Optional[int] = None, no_ray: bool = False,
          train_fn: Optional[Callable[..., Any]] = None) -> Any:
    """Run the job; returns the training function's summary (rank 0's under Ray)."""
    if workers:
        cfg = with_cpu_workers(cfg, workers)
    import bst_dist

    # Which checkout runs: a submitted job's working_dir copy shadows an installed bst_dist.
    log.info("bst_dist %s from %s", bst_dist.__version__, os.path.dirname(os.path.dirname(bst_dist.__file__)))
    cfg = absolute_paths(cfg)  # --no-ray too: Orbax refuses a relative checkpoint path
    if no_ray:
        _check_loggers(cfg)
        return run_in_process(cfg, train_fn)
    addr = resolve_address(address, cfg)
    if addr is None:  # the workers run here, with this environment's packages
        _check_loggers(cfg)

    import ray

    from bst_dist.launch import ray_trainer

    if ray.is_initialized():
        return ray_trainer.fit(cfg, train_fn)
    if addr is None:
        # The dashboard too: Ray Train's placement-group cleaner queries the state API it serves
        # (a minimal `ray` without ray[default] cannot run it; then the cleaner just logs).
        from ray._private.utils import get_dashboard_dependency_error

        from bst_dist.launch.local import LocalRay

        with LocalRay(num_cpus=local_cpus(cfg), dashboard=get_dashboard_dependency_error() is None) as head:
            log.info("embedded Ray on %s (dashboard %s, files in %s); stopped when the run ends", head.address,
                     head.dashboard_url, head.temp_dir)
            head.connect()
            try:
                check_resources(cfg)
                return ray_trainer.fit(cfg, train_fn, extra_env=head.worker_env())
            finally:
                ray.shutdown()
    connect(addr, cfg)
    try:
        return ray_trainer.fit(cfg, train_fn)
    finally:
        ray.shutdown()

"""The job's `ray:` section -> a Ray Train JaxTrainer, and one `fit` on the connected cluster.

GPU: `resources_per_worker: {GPU: <all GPUs of a host>}`, one worker per host (JaxTrainer sets
CUDA_VISIBLE_DEVICES to 0..n-1 in each worker, so two workers on one host would share GPU 0).
TPU: one worker per TPU host; `topology` and `accelerator_type` name the slice, and
`num_workers` = hosts per slice x slices (Ray Train derives the slice count and sets the
MEGASCALE_* variables). In both cases JaxTrainer's backend calls jax.distributed.initialize.
CPU: the same trainer; the workers initialize jax.distributed themselves (worker.py), each with
`cpu_devices_per_worker` fake XLA devices.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

from bst_dist import config as config_lib
from bst_dist.config import JobConfig, RayConfig

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


class TrainingFailed(RuntimeError):
    """The run failed for good (retries exhausted or not retryable); one-line message, cause named."""


def platform(r: RayConfig) -> str:
    return "tpu" if r.use_tpu else "gpu" if r.use_gpu else "cpu"


def cpu_xla_flags(devices: int, existing: str = "") -> str:
    flags = [f for f in existing.split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return " ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}"])


def worker_env(cfg: JobConfig) -> dict[str, str]:
    """Environment variables of every worker: the YAML's runtime_env.env_vars and this process's
    object-storage settings (bst_dist.storage.settings), plus, on CPU,
    JAX_PLATFORMS=cpu and the fake-device count (XLA reads it before JAX starts)."""
    r = cfg.ray
    from bst_dist.storage import worker_env as storage_env

    # the storage endpoint of this process (an emulator, credentials): workers inherit the
    # raylet's environment, not the driver's; the YAML's env_vars win
    env = {**storage_env(), **{str(k): str(v) for k, v in (r.runtime_env.get("env_vars") or {}).items()}}
    if platform(r) == "cpu":
        env.setdefault("JAX_PLATFORMS", "cpu")
        if r.cpu_devices_per_worker:
            existing = env.get("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
            env["XLA_FLAGS"] = cpu_xla_flags(r.cpu_devices_per_worker, existing)
    return env


def resources_per_worker(r: RayConfig) -> dict[str, float]:
    """What each worker reserves (Ray's defaults made explicit: 1 CPU; 1 GPU with use_gpu)."""
    res = {str(k): float(v) for k, v in r.resources_per_worker.items()}
    if r.use_gpu:
        res.setdefault("GPU", 1.0)
    if not r.use_tpu:
        res.setdefault("CPU", 1.0)
    return res


def scaling_config(r: RayConfig):
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=r.num_workers, use_gpu=r.use_gpu, use_tpu=r.use_tpu, topology=r.topology,
        accelerator_type=r.accelerator_type, placement_strategy=r.placement_strategy,
        resources_per_worker=dict(r.resources_per_worker) or None)


def run_config(cfg: JobConfig, extra_env: Optional[dict] = None):
    """extra_env: what the cluster needs of every worker (LocalRay.worker_env); the YAML's wins."""
    from ray.train import FailureConfig, RunConfig

    r = cfg.ray
    return RunConfig(
        name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=r.storage_path,
        failure_config=FailureConfig(max_failures=r.max_failures),
        worker_runtime_env={"env_vars": {**(extra_env or {}), **worker_env(cfg)}})


def build_trainer(cfg: JobConfig, train_fn: Optional[Callable[..., Any]] = None, stop_signal=None,
                  extra_env: Optional[dict] = None):
    from ray.train.v2.jax import JaxConfig, JaxTrainer

    from bst_dist.launch.worker import train_worker

    r = cfg.ray
    return JaxTrainer(
        train_worker,
        train_loop_config={"job": config_lib.to_dict(cfg), "platform": platform(r), "train_fn": train_fn,
                           "stop_signal": stop_signal},
        jax_config=JaxConfig(use_gpu=r.use_gpu, use_tpu=r.use_tpu),
        scaling_config=scaling_config(r), run_config=run_config(cfg, extra_env))


def _line(text: str, *, last: bool = False, limit: int = 300) -> str:
    """One line of `text` (the last one of a traceback is the exception itself), shortened."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = (lines[-1] if last else lines[0]) if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_cause(e: BaseException) -> str:
    """What one rank died of, in a line."""
    from ray.exceptions import RayActorError

    e = getattr(e, "health_check_failure", None) or e  # Ray Train: the worker stopped answering
    if isinstance(e, RayActorError):
        return "worker process died (killed by a signal, out of memory, or its node was lost)"
    base = getattr(e, "_base_exc", None)  # Ray Train: an exception raised by the training function
    if isinstance(base, SystemExit):
        return f"exited with status {base.code}" + (" (SIGTERM: stopped after a final checkpoint)"
                                                    if base.code == 128 + 15 else "")
    if base is not None:
        return f"{type(base).__name__}: {_line(str(base))}"
    text = str(e)
    return _line(text, last="Traceback (most recent call last)" in text) or type(e).__name__


def describe_failure(err: BaseException, max_failures: int) -> str:
    """One line: how many restarts were spent and what each failing rank died of."""
    from ray.train import ControllerError, WorkerGroupError

    budget = f"after {max_failures} restart(s) (ray.max_failures={max_failures})" if max_failures else \
        "with no restarts allowed (ray.max_failures=0)"
    if isinstance(err, WorkerGroupError):
        causes = [f"rank {rank}: {describe_cause(e)}" for rank, e in sorted(err.worker_failures.items())]
        return f"training failed {budget}: " + "; ".join(causes)
    if isinstance(err, ControllerError):
        return f"training failed {budget}: Ray Train controller: {_line(str(err.controller_failure))}"
    return f"training failed {budget}: {_line(str(err))}"


def fit(cfg: JobConfig, train_fn: Optional[Callable[..., Any]] = None, extra_env: Optional[dict] = None) -> Any:
    """Run the job on the Ray cluster this process is connected to; rank 0's summary."""
    from ray.train import TrainingFailedError

    from bst_dist.launch.quiet import drop_harmless_lines
    from bst_dist.launch.stop import driver_sigterm_sets, make_stop_signal
    from bst_dist.launch.worker import FAILED_KEY
    from bst_dist.train.hooks import TrainingError
    from bst_dist.train.preemption import PREEMPTED_EXIT_CODE

    drop_harmless_lines()
    stop_signal = make_stop_signal()
    trainer = build_trainer(cfg, train_fn, stop_signal, extra_env)
    with driver_sigterm_sets(stop_signal) as stopped:
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            raise TrainingFailed(describe_failure(e, cfg.ray.max_failures)) from e
    if stopped.is_set():
        # Every worker saved and returned; the driver ends as a SIGTERMed run does.
        raise SystemExit(PREEMPTED_EXIT_CODE)
    value = result.return_value
    if isinstance(value, dict) and FAILED_KEY in value:
        raise TrainingError(value[FAILED_KEY])  # the run stopped itself; not retried (worker.py)
    return value

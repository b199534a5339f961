"""What runs inside each Ray Train worker: one JAX process of the job.

    train_worker(config) -> summary (rank 0) | None
      1. CPU with several workers: rank 0 picks a coordinator address on its node and broadcasts
         it (ray.train.collective.broadcast_from_rank_zero); every rank calls
         jax.distributed.initialize. (On GPU/TPU, JaxTrainer's backend already did that.)
      2. SIGTERM -> stop request: Ray runs the training function in a thread and Python lets only
         the main thread install signal handlers, so the handler is installed on the actor's main
         thread (idle once the training thread runs) and sets an Event the loop polls.
      2b. A stop of the job reaches the driver only; it sets a Ray actor the workers wait on
         (stop.py), which sets the same Event; the workers then save, return and the run ends.
      3. train_fn(cfg, report=..., [stop=Event]): `report` calls ray.train.report on every rank
         every `train.log_every` steps (it is a barrier across the workers); only rank 0's
         metrics are kept by Ray. Ray's node-drain (preemption) notice also sets the stop Event.
      4. Clean exit: jax.distributed.shutdown() (a barrier) on CPU; rank 0 returns the summary.
         A run that stopped itself (TrainingError: the NaN stop) is a clean exit too, returning
         {"training_error": message}: Ray Train would otherwise retry it into the same stop.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger("bst_dist.launch")

# Signals are delivered per process, so the state they touch is per process too: `_STOP` is
# set by the main-thread SIGTERM handler (or a Ray preemption notice) and read by the training
# thread (passed to it as `stop`);
# `_ACTIVE` says a training function is running; `_PREVIOUS` holds Ray's own handler, which
# still ends the process when no training runs (Ray tears a worker group down with SIGTERM).
_STOP = threading.Event()
_ACTIVE = threading.Event()
_PREVIOUS: list = [None]

FAILED_KEY = "training_error"  # rank 0's return value for a run that stopped itself (TrainingError)


def _on_sigterm(signum, frame) -> None:
    if _ACTIVE.is_set() and not _STOP.is_set():
        print(f"bst-dist worker pid {os.getpid()}: SIGTERM: checkpoint and stop after this step", flush=True)
        _STOP.set()
        return
    previous = _PREVIOUS[0]  # idle, or a second SIGTERM: what would have happened without us
    if callable(previous):
        previous(signum, frame)  # Ray's handler: exit the worker
    elif previous != signal.SIG_IGN:
        os._exit(128 + signal.SIGTERM)


def _install_on_this_thread() -> bool:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    if previous is not _on_sigterm:
        _PREVIOUS[0] = previous
    return True


def install_sigterm_bridge() -> threading.Event:
    """Route this process's SIGTERM to the returned Event while a training function runs."""
    _STOP.clear()
    if threading.current_thread() is threading.main_thread():
        _install_on_this_thread()
        return _STOP
    try:
        import ray

        # The Ray Train worker actor runs tasks on its main thread; `execute` is its generic
        # "run this function here" method. Runs in this same process, so it sees `_STOP`.
        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(_install_on_this_thread), timeout=60)
    except Exception as e:  # noqa: BLE001 - degrade to Ray's default (exit without a final save)
        log.warning("SIGTERM handler not installed (%s): a SIGTERM ends this worker without a final checkpoint", e)
    return _STOP


def init_cpu_distributed(rank: int, world: int) -> None:
    """jax.distributed over Ray: rank 0's node IP and a free port, broadcast to every rank."""
    import ray.util
    from ray.train.collective import broadcast_from_rank_zero

    from bst_dist.launch.local import free_port

    addr = None
    if rank == 0:
        ip = ray.util.get_node_ip_address()
        addr = f"{ip}:{free_port(ip)}"
    addr = broadcast_from_rank_zero(addr)
    import jax

    # Bind the coordinator to the node IP only (127.0.0.1 for the embedded local Ray), not [::].
    jax.distributed.initialize(coordinator_address=addr, num_processes=world, process_id=rank,
                               coordinator_bind_address=addr if rank == 0 else None)


def _plain(metrics: dict) -> dict:
    """Python scalars only (Ray pickles reports; jax/numpy scalars would drag their modules in)."""
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            v = v.item()
        out[k] = v
    return out


class _RayPreemption:
    """Ray's own preemption notice (a node being drained: a KubeRay pod deleted, a spot VM
    reclaimed through the autoscaler, `ray start` getting SIGTERM), turned into the same stop
    request as a SIGTERM. Ray's PreemptionWatcher marks every worker of the group; this reads the
    mark locally after each report (no extra collective: the loop's own per-step agreement on
    `stop` makes the decision the same on every process). After the final checkpoint the workers
    wait for Ray to tear the group down, so that Ray counts a preemption
    (FailureConfig.max_preemption_failures, unlimited by default) rather than a failure."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.info = None

    @staticmethod
    def _local_notice():
        try:
            from ray.train.v2._internal.execution.context import get_train_context

            return get_train_context().preemption_context.preemption_info
        except Exception:  # noqa: BLE001 - a Ray without preemption notices
            return None

    def check(self) -> None:
        info = self._local_notice()
        if info is not None and self.info is None:
            self.info = info
            print(f"bst-dist worker pid {os.getpid()}: Ray preempts ranks {info.preempted_ranks}: "
                  "checkpoint and stop after this step", flush=True)
            self.stop.set()

    def wait_for_teardown(self, limit_s: float = 600.0) -> None:
        deadline_ms = getattr(self.info, "deadline_ms", None)
        wait = limit_s if deadline_ms is None else min(limit_s, max(0.0, deadline_ms / 1000 - time.time()) + 60.0)
        log.warning("checkpoint saved; waiting up to %.0fs for Ray to replace the preempted node", wait)
        time.sleep(wait)


def make_report(*, every: int = 1, last_step: Optional[int] = None,
                preemption: Optional[_RayPreemption] = None) -> Callable[[dict], None]:
    """The loop's per-step `report`. Forwards to ray.train.report on steps that are multiples of
    `every` (and the last step): Ray Train's controller takes one report per worker every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s) and a worker's second pending report blocks, so
    reporting every fast step would throttle training. The choice depends on the step only, so
    every rank makes the same number of calls (report is a barrier across the workers)."""
    import ray.train

    def report(metrics: dict) -> None:
        step = metrics.get("step")
        if step is None or step % every == 0 or step == last_step:
            ray.train.report(_plain(metrics))
        if preemption is not None:
            preemption.check()

    return report


def accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def default_train_fn() -> Callable[..., dict]:
    from bst_dist.runs.job import train_job

    return train_job


def _setup_logging(rank: int) -> None:
    # Ray sets INFO on the root logger of workers; keep libraries (Orbax's per-save lines, Ray
    # Train's per-report lines) at WARNING, and our own loggers at INFO on rank 0.
    logging.getLogger().setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    for name in ("bst_dist", "data_pipelines"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(h)
            logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
            logger.propagate = False


def train_worker(config: dict) -> Optional[Any]:
    """The Ray Train per-worker function. `config`: job (a config dict), platform, train_fn."""
    import ray.train

    from bst_dist import config as config_lib

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _setup_logging(rank)
    cfg = config_lib.from_dict(config["job"])
    cpu_multi = config["platform"] == "cpu" and world > 1
    if cpu_multi:
        init_cpu_distributed(rank, world)
    stop = install_sigterm_bridge()
    asked = threading.Event()  # the driver asked to stop (bst-dist stop, ray job stop, its SIGTERM)
    if config.get("stop_signal") is not None:
        from bst_dist.launch.stop import watch

        def on_stop(why: str) -> None:
            if not stop.is_set():
                print(f"bst-dist worker pid {os.getpid()}: {why}: checkpoint and stop after this step", flush=True)
            asked.set()
            stop.set()

        watch(config["stop_signal"], on_stop)
    train_fn = config.get("train_fn") or default_train_fn()
    preemption = None
    kwargs: dict = {}
    if accepts(train_fn, "stop"):
        kwargs["stop"] = stop
        preemption = _RayPreemption(stop)
    elif rank == 0:
        log.warning("the training function takes no `stop` event: SIGTERM cannot trigger a final checkpoint")
    kwargs["report"] = make_report(every=max(1, cfg.train.log_every), last_step=cfg.train.steps, preemption=preemption)
    from bst_dist.train.hooks import TrainingError

    _ACTIVE.set()
    try:
        summary = train_fn(cfg, **kwargs)
    except TrainingError as e:
        # The run stopped itself (the NaN stop, with a checkpoint) on every rank at the same step:
        # a restart would resume into the same stop. Return, so Ray Train ends the run without
        # retrying; the driver raises it as the one-line error (ray_trainer.fit).
        summary = {FAILED_KEY: str(e)}
    except SystemExit:
        if asked.is_set():
            # A stop, not a failure: return, so Ray Train ends the run instead of restarting it.
            return {"stopped": True} if rank == 0 else None
        if preemption is not None and preemption.info is not None:
            preemption.wait_for_teardown()
        raise
    finally:
        _ACTIVE.clear()
    if cpu_multi:
        import jax

        jax.distributed.shutdown()
    return summary if rank == 0 else None

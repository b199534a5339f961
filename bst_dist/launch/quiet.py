"""Lines Ray prints to the driver that say nothing about the job, kept out of the user's output.

Ray forwards every worker's and actor's stdout/stderr to the driver (the "(RayTrainWorker
pid=...)" lines). Most of it is the job's; a few lines are Ray's own, logged at error level about
something harmless to this job, and read as failures. They are dropped from what the driver
prints (they stay in the session's log files). Each entry says why it is harmless.
"""

from __future__ import annotations

HARMLESS = (
    # Ray Train's PreemptionWatcher actor (max_restarts=-1) gets its worker handles as arguments;
    # core_worker warns, at error level, that a restart would need them. A lost watcher only means
    # no preemption notice for that worker group; SIGTERM still reaches the workers.
    "has constructor arguments in the object store and max_restarts > 0",
)

_HANDLER = "ray_print_logs"  # ray._private.worker.connect's name for the handler that prints


def _without_noise(handler):
    def handle(data: dict) -> None:
        lines = data.get("lines")
        if lines:
            kept = [line for line in lines if not any(text in line for text in HARMLESS)]
            if not kept:
                return
            data = {**data, "lines": kept}
        handler(data)

    handle.bst_dist_quiet = True
    return handle


def drop_harmless_lines() -> None:
    """Filter this driver's printing of worker lines (after ray.init; idempotent). A Ray without
    this hook prints everything, as before."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    for name, handler in list(getattr(dispatcher, "handlers", ())):
        if name == _HANDLER and not getattr(handler, "bst_dist_quiet", False):
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, _without_noise(handler))

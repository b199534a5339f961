"""`bst-dist stop` / `ray job stop` / a SIGTERM to the driver -> a final checkpoint on every worker.

Stopping a job signals only its driver: Ray's job server sends SIGTERM to the entrypoint, waits
RAY_JOB_STOP_WAIT_TIME_S (default 3 s) and then SIGKILLs it, and the worker actors die with
their owner. The workers never see a signal of their own, so their SIGTERM handler cannot help.
Instead the driver catches SIGTERM and sets a `StopSignal` actor; every worker waits on it in a
background thread and turns it into the loop's stop request (checkpoint after this step, exit).
The bound on the whole stop is RAY_JOB_STOP_WAIT_TIME_S: one step plus one save must fit in it.

    signal = StopSignal.options(...).remote(); handle passed to the workers
    with driver_sigterm_sets(signal) as requested: trainer.fit()   # driver side
    watch(signal, on_stop)                                         # worker side (a thread)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Callable, Iterator

log = logging.getLogger("bst_dist.launch")

# How long `bst-dist submit` asks Ray's job server to wait for the driver after a stop, unless the
# job file's runtime_env sets it: one step plus one checkpoint of the paper jobs.
STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"
DEFAULT_STOP_WAIT_S = 60


def make_stop_signal():
    """A tiny async actor: `set()` once, `wait()` returns when set. Owned by the driver, so it
    dies with it; a worker whose wait fails that way stops too."""
    import asyncio

    import ray

    @ray.remote(num_cpus=0, max_concurrency=1000)
    class StopSignal:
        def __init__(self):
            self._event = asyncio.Event()

        def set(self) -> None:
            self._event.set()

        async def wait(self) -> bool:
            await self._event.wait()
            return True

    return StopSignal.remote()


@contextlib.contextmanager
def driver_sigterm_sets(stop_signal) -> Iterator[threading.Event]:
    """While the driver waits for the workers, SIGTERM sets `stop_signal` (once; the driver
    keeps waiting for the workers' final save). The yielded Event says whether it fired."""
    fired = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield fired
        return

    def on_sigterm(signum, frame):
        if fired.is_set():
            return
        fired.set()
        print(f"bst-dist driver pid {os.getpid()}: SIGTERM: asking every worker to checkpoint and stop "
              f"(the job server waits {os.environ.get(STOP_WAIT_ENV, 3)} s, {STOP_WAIT_ENV})", file=sys.stderr, flush=True)
        stop_signal.set.remote()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield fired
    finally:
        signal.signal(signal.SIGTERM, previous)


def watch(stop_signal, on_stop: Callable[[str], None]) -> threading.Thread:
    """Worker side: a daemon thread that calls `on_stop(why)` once the driver asks to stop (or
    the driver is gone)."""
    import ray

    def run():
        try:
            ray.get(stop_signal.wait.remote())
            on_stop("the driver was stopped")
        except Exception as e:  # noqa: BLE001 - the actor died with its driver: stop as well
            on_stop(f"the driver's stop signal is gone ({type(e).__name__})")

    t = threading.Thread(target=run, name="bst-dist-stop-watch", daemon=True)
    t.start()
    return t

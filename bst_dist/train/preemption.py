"""Turn SIGTERM and SIGINT (Ctrl-C) into a request to checkpoint and stop, instead of death
mid-step.

    with PreemptionGuard() as guard:
        for step in ...:
            ...
            if any_process(guard.requested):      # every process, same steps: a collective
                ckpt.save(step, ..., force=True); ckpt.wait()
                return guard.exit_code             # 143 after SIGTERM, 130 after Ctrl-C

Exiting non-zero makes the supervisor (Ray Train's FailureConfig, Kubernetes, a batch system)
restart the job, and the next run resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np

log = logging.getLogger(__name__)

# 128 + SIGTERM(15): the status a shell reports for a process killed by SIGTERM, so the run
# looks to a supervisor exactly like what happened to it (terminated, restartable), not like a
# crash (1) or a refused job spec (2).
PREEMPTED_EXIT_CODE = 143
# 128 + SIGINT(2): what a shell reports for Ctrl-C; a supervisor reads it as "the user stopped it".
INTERRUPTED_EXIT_CODE = 130


class PreemptionGuard:
    """Context manager: SIGTERM and SIGINT set `.requested` (and `.signal`, the first received).

    A second signal of the same kind runs the previous handler (a second Ctrl-C still
    interrupts, a second SIGTERM still kills). Previous handlers are restored on exit.
    Python only lets the main thread install handlers: elsewhere (e.g. a Ray Train worker's
    training thread) the guard installs nothing, logs why, and `.request()` remains the way for
    another mechanism to ask for a stop.
    """

    def __init__(self, *, event: threading.Event | None = None):
        self._signals = [signal.SIGTERM, signal.SIGINT]
        self._previous: dict[int, object] = {}
        # `event`: a stop request from elsewhere (a Ray worker's main-thread SIGTERM bridge,
        # Ray's drain notice) that the loop treats exactly like its own SIGTERM.
        self._event = event if event is not None else threading.Event()
        self._count: dict[int, int] = {}
        self.signal: int | None = None

    @property
    def exit_code(self) -> int:
        """130 when the stop came from Ctrl-C, else 143 (SIGTERM or the stop event)."""
        return INTERRUPTED_EXIT_CODE if self.signal == signal.SIGINT else PREEMPTED_EXIT_CODE

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self) -> None:
        self._event.set()

    def _handle(self, signum, frame):
        self._count[signum] = self._count.get(signum, 0) + 1
        if self._count[signum] == 1:
            log.warning("received %s: will checkpoint and stop after this step%s", signal.Signals(signum).name,
                        " (press Ctrl-C again to stop at once, without it)" if signum == signal.SIGINT else "")
            if self.signal is None:
                self.signal = signum
            self._event.set()
            return
        if signum == signal.SIGINT:
            # stop at once, whatever handler was there before (an in-process Ray trainer installs
            # one that only asks its run to abort gracefully)
            raise KeyboardInterrupt
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            log.debug("PreemptionGuard: not the main thread; stop requests come through the event")
            return self
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def any_process(flag: bool) -> bool:
    """True if `flag` is true on any JAX process.

    With several processes this is a collective (an allgather of one int): every process must
    call it at the same points, e.g. every step or every k-th step.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(bool(flag), dtype=np.int32))
    return bool(np.any(flags))

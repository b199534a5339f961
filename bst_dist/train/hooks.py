"""The side concerns of a training run, as hooks around the loop in `train/loop.py`.

A hook sees the `Run` (the state, cache, step and the last step's metrics) at three moments:
`on_start` once the state exists, `after_step` after every step, `on_end(ok)` when the loop
ends (ok: it reached `train.steps`). A hook that must end the run raises: `SystemExit` for a
requested stop, `TrainingError` for a run that cannot go on. Hooks run in list order, so the
order below is the order of effects after a step: checkpoint it (timing the loop's stall), log
and report it, then decide whether to stop.

The hooks that need evaluation or plotting live beside those packages (`eval/hook.py`,
`runs/plot.py`) and are added by `runs/job.py`; nothing here imports them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax

from bst_dist import config as config_lib
from bst_dist.config import JobConfig
from bst_dist.errors import UserError
from bst_dist.models.flops import train_step_flops
from bst_dist.train.checkpoint import Checkpointer
from bst_dist.train.metrics import MetricsLogger, device_peak_flops, mfu
from bst_dist.train.preemption import INTERRUPTED_EXIT_CODE, PreemptionGuard, any_process
from bst_dist.train.state import Setup

log = logging.getLogger("bst_dist.train")


class TrainingError(UserError, RuntimeError):
    """The run stopped itself (e.g. too many non-finite steps in a row); a checkpoint was saved."""


@dataclass
class Run:
    """What the loop and its hooks share: the job, the live state and the last step's record."""

    cfg: JobConfig
    setup: Setup
    ckpt: Checkpointer
    loader: Any
    state: Any
    cache: Any
    step: int
    tokens_seen: int = 0
    start_step: int = 0
    record: dict = field(default_factory=dict)
    losses: list = field(default_factory=list)
    logger: Any = None  # the MetricsLogger (set by the Metrics hook): other hooks log through it
    started_at: float = field(default_factory=time.time)  # when train() began (time.time())
    state_time: float = 0.0  # seconds to create or restore the state

    @property
    def chief(self) -> bool:
        return jax.process_index() == 0

    def meta(self) -> dict:
        return {"config": config_lib.to_dict(self.cfg), "tokens_seen": self.tokens_seen, "step": self.step}

    def save(self, *, force: bool = False) -> None:
        self.ckpt.save(self.step, state=self.state, cache=self.cache, data_iter=self.loader, meta=self.meta(),
                       force=force)

    def save_now(self) -> None:
        """A checkpoint of this step on disk before returning (stop requests, the NaN stop)."""
        self.save(force=True)
        self.ckpt.wait()


class Hook:
    def on_start(self, run: Run) -> None: ...

    def after_step(self, run: Run) -> None: ...

    def on_end(self, run: Run, ok: bool) -> None: ...


class Metrics(Hook):
    """metrics.jsonl, TensorBoard and the progress line (chief), and the Ray report (all ranks)."""

    def __init__(self, report: Callable[[dict], None] | None = None):
        self.report = report

    def on_start(self, run: Run) -> None:
        t = run.cfg.train
        self.logger = run.logger = MetricsLogger(t.run_dir, is_chief=run.chief, total_steps=t.steps,
                                                 log_every=t.log_every)
        self.logger.truncate_after(run.step)  # a resume rewrites the steps after its checkpoint
        self.flops = train_step_flops(run.cfg.model, t.global_batch_size)
        self.peak = device_peak_flops(jax.devices()[0])

    def after_step(self, run: Run) -> None:
        r = run.record
        r["mfu"] = mfu(self.flops, r["step_time"] - r["data_time"], jax.device_count(), self.peak)
        self.logger.log(run.step, r)
        self.logged = run.step
        if self.report is not None:
            self.report({"step": run.step, **r})

    def on_end(self, run: Run, ok: bool) -> None:
        if run.record and getattr(self, "logged", run.start_step) < run.step:
            self.logger.log(run.step, run.record)  # the step an earlier hook ended the run at (a failed save)
        self.logger.close()


class Checkpoints(Hook):
    """Saves every `checkpoint.every` steps and at the last. The step's `ckpt_time` is the wall
    time the loop spends in checkpoint work: on a save step the copy of the state to the host and
    the wait for the previous save, on the others the check of a save in flight."""

    def after_step(self, run: Run) -> None:
        last = run.step == run.cfg.train.steps
        if last or run.ckpt.should_save(run.step):
            jax.block_until_ready((run.state, run.cache))  # the device finishing the step is step time
        t0 = time.perf_counter()
        run.save(force=last)
        run.record["ckpt_time"] = time.perf_counter() - t0

    def on_end(self, run: Run, ok: bool) -> None:
        if ok:
            run.ckpt.wait()


class StopOnRequest(Hook):
    """SIGTERM (or the launcher's stop event) -> a checkpoint of this step, then exit 143;
    Ctrl-C (SIGINT) the same, then exit 130."""

    def __init__(self, stop: threading.Event | None = None):
        self.guard = PreemptionGuard(event=stop)

    def on_start(self, run: Run) -> None:
        self.guard.__enter__()

    def after_step(self, run: Run) -> None:
        if any_process(self.guard.requested):  # a collective: every process stops at the same step
            run.save_now()
            code = self.guard.exit_code
            what = "interrupted" if code == INTERRUPTED_EXIT_CODE else "preempted"
            log.warning("%s: saved step %d; exiting with status %d", what, run.step, code)
            raise SystemExit(code)

    def on_end(self, run: Run, ok: bool) -> None:
        self.guard.__exit__(None, None, None)


class NanGuard(Hook):
    """More than `train.max_nan_steps` skipped (non-finite) steps in a row: save and stop."""

    def on_start(self, run: Run) -> None:
        self.streak = 0

    def after_step(self, run: Run) -> None:
        self.streak = self.streak + 1 if run.record["skipped"] else 0
        limit = run.cfg.train.max_nan_steps
        if self.streak > limit:
            run.save_now()
            raise TrainingError(f"{self.streak} non-finite steps in a row (train.max_nan_steps={limit}); "
                                f"saved step {run.step}; lower the learning rate or check the data")


def standard_hooks(report=None, stop=None) -> list[Hook]:
    return [Checkpoints(), Metrics(report), StopOnRequest(stop), NanGuard()]

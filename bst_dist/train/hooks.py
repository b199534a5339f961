"""The side concerns of a training run, as hooks around the loop in `train/loop.py`.

A hook sees the `Run` (the state, cache, step and the last step's metrics) at three moments:
`on_start` once the state exists, `after_step` after every step, `on_end(ok)` when the loop
ends (ok: it reached `train.steps`). A hook that must end the run raises: `SystemExit` for a
requested stop, `TrainingError` for a run that cannot go on. Hooks run in list order, so the
order below is the order of effects after a step: checkpoint it (timing the loop's stall), log
and report it, then decide whether to stop. The profiler (`Profile`) comes after every other
hook, so that its trace holds whole steps.

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
import numpy as np

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
    record: dict = field(default_factory=dict)  # the newest fetched step's metrics
    losses: list = field(default_factory=list)
    # Steps whose metrics are still on the device: the loop never waits for the device between
    # log steps; `fetch` reads them all at once (the Metrics hook, every train.log_every steps).
    pending: list = field(default_factory=list)
    fetched: list = field(default_factory=list)  # (step, record) read by this step's fetch
    fetched_at: float = field(default_factory=time.perf_counter)
    excluded: float = 0.0  # loop seconds since the last fetch that are not step time (evaluation)
    logger: Any = None  # the MetricsLogger (set by the Metrics hook): other hooks log through it
    started_at: float = field(default_factory=time.time)  # when train() began (time.time())
    state_time: float = 0.0  # seconds to create or restore the state

    @property
    def chief(self) -> bool:
        return jax.process_index() == 0

    def meta(self) -> dict:
        return {"config": config_lib.to_dict(self.cfg), "tokens_seen": self.tokens_seen, "step": self.step}

    def advance(self, out: dict, *, data_time: float) -> None:
        """Count a dispatched step; its metrics `out` (device scalars) wait for `fetch`."""
        B, L = self.cfg.train.global_batch_size, self.cfg.model.seq_len
        self.step += 1
        self.tokens_seen += B * L
        self.fetched = []
        self.pending.append({"step": self.step, "out": out, "data_time": data_time, "ckpt_time": 0.0,
                             "tokens_seen": self.tokens_seen})
        if len(self.pending) >= 2:
            # At most two steps in flight: this one, dispatched, and the one before it, awaited
            # here (no copy to the host). Unbounded, the dispatch runs up to log_every steps
            # ahead; on CPU with several devices in one process, XLA's in-process collectives
            # then stall (a step's all-gather waits for device threads taken by later steps) and
            # abort the process after 40 s. One step of lag keeps the device busy all the same.
            jax.block_until_ready(self.pending[-2]["out"])

    def note_ckpt_time(self, seconds: float) -> None:
        """The checkpoint stall of the step just dispatched (ckpt_time; not step time)."""
        if self.pending:
            self.pending[-1]["ckpt_time"] += seconds
        else:
            self.excluded += seconds

    def exclude(self, seconds: float) -> None:
        """Loop time that is not step time (evaluation), left out of step_time and tokens/s."""
        self.excluded += seconds

    def fetch_due(self) -> bool:
        """Log steps (train.log_every), the last step and this process's first step."""
        t = self.cfg.train
        return self.step % t.log_every == 0 or self.step >= t.steps or self.step == self.start_step + 1

    def fetch(self) -> list:
        """Read every pending step's metrics from the device (the one host sync between log
        steps) -> [(step, record)], also in `fetched`; `record` is the newest. step_time is the
        mean wall time per step since the previous fetch, checkpoint stalls and evaluation left
        out (steps overlap their data loading, so it is the loop's real pace)."""
        if not self.pending:
            return []
        outs = jax.device_get([p["out"] for p in self.pending])
        now = time.perf_counter()
        stalls = sum(p["ckpt_time"] for p in self.pending) + self.excluded
        step_time = max(now - self.fetched_at - stalls, 1e-9) / len(self.pending)
        B, L = self.cfg.train.global_batch_size, self.cfg.model.seq_len
        fetched = []
        for p, out in zip(self.pending, outs):
            loss = float(out["loss"])
            self.losses.append(loss)
            fetched.append((p["step"], {
                "loss": loss, "ppl": float(np.exp(min(loss, 50.0))), "grad_norm": float(out["grad_norm"]),
                "tokens_per_sec": B * L / step_time, "step_time": step_time, "data_time": p["data_time"],
                "ckpt_time": p["ckpt_time"], "tokens_seen": p["tokens_seen"], "skipped": int(out["skipped"])}))
        self.pending, self.fetched, self.fetched_at, self.excluded = [], fetched, now, 0.0
        self.record = fetched[-1][1]
        return fetched

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
    """metrics.jsonl, TensorBoard, W&B and the progress line (chief), and the Ray report (all ranks)."""

    def __init__(self, report: Callable[[dict], None] | None = None):
        self.report = report

    def on_start(self, run: Run) -> None:
        t = run.cfg.train
        self.logger = run.logger = MetricsLogger(t.run_dir, is_chief=run.chief, total_steps=t.steps,
                                                 log_every=t.log_every, loggers=t.loggers, wandb=t.wandb,
                                                 job_name=run.cfg.name, job_config=config_lib.to_dict(run.cfg))
        self.logger.truncate_after(run.step)  # a resume rewrites the steps after its checkpoint
        self.flops = train_step_flops(run.cfg.model, t.global_batch_size)
        self.peak = device_peak_flops(jax.devices()[0])

    def after_step(self, run: Run) -> None:
        if run.fetch_due():
            self.log(run.fetch())

    def log(self, fetched: list) -> None:
        for step, r in fetched:
            # data loading overlaps the device's work: the step's pace is step_time
            r["mfu"] = mfu(self.flops, r["step_time"], jax.device_count(), self.peak)
            self.logger.log(step, r)
            if self.report is not None:
                self.report({"step": step, **r})

    def on_end(self, run: Run, ok: bool) -> None:
        try:
            self.log(run.fetch())  # the steps since the last log step (a stop, a failed save)
        except Exception:  # noqa: BLE001 - a device that failed: the run's own error says why
            log.debug("could not fetch the last steps' metrics", exc_info=True)
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
        run.note_ckpt_time(time.perf_counter() - t0)

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
    """More than `train.max_nan_steps` skipped (non-finite) steps in a row: save and stop. Seen
    when the steps' metrics are fetched (every train.log_every steps), so the stop saves the
    step of that fetch; a skipped step changes no parameters, so the saved weights are the
    ones before the streak."""

    def on_start(self, run: Run) -> None:
        self.streak = 0

    def after_step(self, run: Run) -> None:
        for _, r in run.fetched:  # the steps fetched at this step (every train.log_every steps)
            self.streak = self.streak + 1 if r["skipped"] else 0
        limit = run.cfg.train.max_nan_steps
        if self.streak > limit:
            run.save_now()
            raise TrainingError(f"{self.streak} non-finite steps in a row (train.max_nan_steps={limit}); "
                                f"saved step {run.step}; lower the learning rate or check the data")


class Profile(Hook):
    """train.profile_steps [start, stop]: a JAX profiler trace of steps start+1..stop on process 0,
    written where TensorBoard's profile plugin finds it (<run_dir>/tb/plugins/profile/<time>/).

    Started after step `start` and its hooks, stopped after step `stop` and its hooks, so the
    trace holds those steps whole (the loop marks each with a StepTraceAnnotation). Placed last
    in the hook list for that reason. A resumed run inside the window traces what is left of it."""

    def on_start(self, run: Run) -> None:
        self.window = run.cfg.train.profile_steps if run.chief else None
        self.active = False
        self._maybe_start(run)

    def _maybe_start(self, run: Run) -> None:
        if self.window and not self.active and self.window[0] <= run.step < self.window[1]:
            local_run_dir = run.logger.run_dir if run.logger is not None else run.cfg.train.run_dir
            jax.profiler.start_trace(os.path.join(local_run_dir, "tb"))
            self.active = True

    def _stop(self, run: Run) -> None:
        jax.block_until_ready((run.state, run.cache))  # the last step's work is in the trace
        jax.profiler.stop_trace()
        self.active, self.window = False, None
        log.info("profile of steps %d..%d written under %s", *run.cfg.train.profile_steps,
                 os.path.join(run.cfg.train.run_dir, "tb"))

    def after_step(self, run: Run) -> None:
        if self.active and run.step >= self.window[1]:
            self._stop(run)
        else:
            self._maybe_start(run)

    def on_end(self, run: Run, ok: bool) -> None:
        if self.active:
            self._stop(run)


def standard_hooks(report=None, stop=None) -> list[Hook]:
    return [Checkpoints(), Metrics(report), StopOnRequest(stop), NanGuard()]

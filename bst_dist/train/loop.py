"""The training run, top to bottom: `train(cfg)`, run by every JAX process of a job (under Ray
Train or directly).

    mesh -> run-directory lock -> checkpointer -> loader -> initial state (created, or restored)
         -> steps -> summary

Everything else a run does (metrics and progress, checkpoints, the stop request, the NaN stop,
the Ray report, evaluation, plots) is a hook (`train/hooks.py`). `jax.distributed` is already
initialised when there are several processes (bst_dist.launch does that); each process feeds
only its own data lanes. Rerunning a job resumes from its newest complete checkpoint: the same
data position, the same cache, the same loss curve.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np
import yaml

from bst_dist import config as config_lib
from bst_dist import parallel, storage
from bst_dist.config import JobConfig
from bst_dist.errors import UserError
from bst_dist.train import compile_cache
from bst_dist.train.checkpoint import Checkpointer, NoReadableCheckpoint, check_compatible, check_writable
from bst_dist.train.hooks import Hook, Profile, Run, TrainingError, standard_hooks  # noqa: F401 (TrainingError: API)
from bst_dist.train.lock import RunLock, RunLocked
from bst_dist.train.preemption import any_process
from bst_dist.train.state import initial_state
from bst_dist.train.step import batch_shardings, make_train_step

log = logging.getLogger("bst_dist.train")


def train(cfg: JobConfig, *, report: Callable[[dict], None] | None = None, stop: threading.Event | None = None,
          hooks: Sequence[Hook] = ()) -> dict:
    """Train (or resume) the job in this process; returns the run's summary on every process.

    report: called for every step on every process with its metrics (Ray's report hook), at the
    log steps, when the loop reads the steps' metrics from the device.
    stop: set by another thread to ask for a checkpoint and exit, like SIGTERM (Ray workers run
    this function on a thread that cannot install signal handlers).
    hooks: more hooks after the standard ones (evaluation and plots: see runs/job.py)."""
    from data_pipelines import make_loader

    started_at = time.time()
    compile_cache.enable(cfg.train.compile_cache)  # before the first compile (a collective compiles too)
    mesh = parallel.make_mesh(cfg.mesh)
    check_batch(cfg, mesh)
    t = cfg.train
    with hold_run_dir(cfg), open_checkpointer(cfg) as ckpt:
        check_steps(cfg, ckpt)
        if jax.process_index() == 0:
            write_job(cfg)  # only now: a refused rerun must not overwrite the job.yaml of its checkpoints
        # Lane b is global row b: each process loads the rows its devices hold (interleaved on
        # TPU), so a lane keeps its document position and its cache row on any layout.
        assignment = parallel.lane_assignment(parallel.batch_sharding(mesh, 1, parallel.rules_from_config(cfg.mesh)),
                                              t.global_batch_size)
        loader = make_loader(cfg.data, seq_len=cfg.model.seq_len, global_batch_size=t.global_batch_size,
                             process_index=jax.process_index(), process_count=jax.process_count(),
                             split="train", seed=t.seed, lanes=assignment[str(jax.process_index())],
                             assignment=assignment)
        with contextlib.closing(loader):
            t0 = time.time()
            start = initial_state(cfg, mesh, ckpt, data_iter=loader)
            jax.block_until_ready((start.state, start.cache))
            run = Run(cfg, start.setup, ckpt, loader, start.state, start.cache, start.step,
                      tokens_seen=int(start.meta.get("tokens_seen", 0)), start_step=start.step,
                      started_at=started_at, state_time=time.time() - t0)
            step_fn, shardings = make_train_step(run.setup), batch_shardings(run.setup)
            hooks = [*standard_hooks(report, stop), *hooks, Profile()]  # last: it traces whole steps
            for h in hooks:
                h.on_start(run)
            log_start(run)
            run.fetched_at = time.perf_counter()
            # the rows this process's data lands on (what make_array_from_process_local_data does)
            trace = parallel.LaneTrace.from_env(parallel.process_lanes(shardings["inputs"], t.global_batch_size))
            ok = False
            try:
                for _ in range(run.step, t.steps):
                    # named for the profiler (train.profile_steps); costs nothing when not tracing
                    with jax.profiler.StepTraceAnnotation("train", step_num=run.step + 1):
                        t0 = time.perf_counter()
                        local = next(loader)
                        if trace is not None:
                            trace.write(run.step, local)
                        batch = global_batch(local, shardings)
                        data_time = time.perf_counter() - t0
                        run.state, run.cache, out = step_fn(run.state, run.cache, batch)
                        run.advance(out, data_time=data_time)  # no wait for the device (Run.fetch)
                    for h in hooks:
                        h.after_step(run)
                    if run.step == run.start_step + 1 and run.chief:
                        log.info("first step done %.1fs after start", time.time() - run.started_at)
                ok = True
            finally:
                if trace is not None:
                    trace.close()
                for h in reversed(hooks):
                    h.on_end(run, ok)
    return finish(run)


def check_steps(cfg: JobConfig, ckpt: Checkpointer) -> None:
    """A job whose train.steps is below its newest checkpoint would train nothing and report the
    run done at a step it is not at: refused, before job.yaml is touched."""
    latest = ckpt.latest_step()
    if latest is not None and latest > cfg.train.steps:
        raise UserError(f"train.steps {cfg.train.steps} is below the run's newest checkpoint, step {latest} "
                        f"({ckpt.directory}): set train.steps >= {latest} to continue the run, or choose another "
                        "train.run_dir for a new one")


def check_batch(cfg: JobConfig, mesh) -> None:
    """Refuse, before any compilation, a batch (or heads) the mesh or the processes cannot split."""
    parallel.check_fits(cfg, dict(mesh.shape), jax.process_count())


@contextlib.contextmanager
def hold_run_dir(cfg: JobConfig):
    """Process 0 holds the run directory's lock (train/lock.py) for the whole run; every process
    learns whether it got it (a collective), so a refused run stops everywhere at once."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = RunLock(cfg.train.run_dir).acquire()
        except (RunLocked, OSError) as e:
            error = e
    if any_process(error is not None):
        if isinstance(error, OSError):
            raise UserError(f"train.run_dir {cfg.train.run_dir} is not writable "
                            f"({error.strerror or error}); choose a writable train.run_dir") from None
        raise error or RunLocked(f"train.run_dir {cfg.train.run_dir}: process 0 could not lock it")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def checkpoint_dir(cfg: JobConfig) -> str:
    d = cfg.checkpoint.dir or storage.join(cfg.train.run_dir, "checkpoints")
    return d if storage.is_url(d) else os.path.abspath(d)  # Orbax takes absolute paths only


def open_checkpointer(cfg: JobConfig) -> Checkpointer:
    """The run's checkpointer, after refusing a newest checkpoint the job cannot continue from
    (IncompatibleCheckpoint naming the difference) before the data, the model or any
    compilation, and after a probe write (CheckpointWriteError: an unwritable or full location
    is found before the first step, not at the first save). The restore checks each candidate
    again; an unreadable newest step is left to its fallback."""
    c = cfg.checkpoint
    storage.check_bucket(checkpoint_dir(cfg), "checkpoint.dir" if c.dir else "train.run_dir")
    check_writable(checkpoint_dir(cfg))  # before Orbax's manager: its threads outlive a refused start
    ckpt = Checkpointer(checkpoint_dir(cfg), every=c.every, keep_last=c.keep_last, keep_every=c.keep_every,
                        async_save=c.async_save, poll_every=cfg.train.log_every)
    try:
        latest = ckpt.latest_step()
        if latest is not None:
            try:
                meta = ckpt.read_meta(latest)
            except NoReadableCheckpoint:
                meta = None
            if meta is not None:
                check_compatible(meta, config_lib.to_dict(cfg), source=ckpt.directory)
    except BaseException:
        ckpt.close()
        raise
    return ckpt


def global_batch(local: dict, shardings: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(s, np.asarray(local[k])) for k, s in shardings.items()}


def write_job(cfg: JobConfig) -> None:
    storage.makedirs(cfg.train.run_dir)
    storage.write_text(storage.join(cfg.train.run_dir, "job.yaml"),
                       yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))


def log_start(run: Run) -> None:
    if run.start_step:
        log.info("resumed from %s step %d", run.ckpt.directory, run.start_step)
    if run.chief:
        log.info("training %s: %d devices, mesh %s, steps %d..%d, state %s in %.1fs, %.1fs since start",
                 run.cfg.name, jax.device_count(), dict(run.setup.mesh.shape), run.step, run.cfg.train.steps,
                 "restored" if run.start_step else "created", run.state_time, time.time() - run.started_at)


def finish(run: Run) -> dict:
    """The run's summary (every process; the chief writes summary.json)."""
    summary = {"final_step": run.cfg.train.steps, "start_step": run.start_step, "losses": run.losses,
               "run_dir": run.cfg.train.run_dir, "tokens_seen": run.tokens_seen,
               "params_digest": tree_digest(run.state["params"]),
               "opt_state_digest": tree_digest(run.state["opt_state"]), "cache_digest": tree_digest(run.cache)}
    path = storage.join(run.cfg.train.run_dir, "summary.json")
    if run.step == run.start_step and run.step > 0 and storage.exists(path):
        # A rerun of a complete run trains nothing: it keeps the record of the run that did.
        log.info("%s is complete at step %d: nothing to train; %s kept", run.cfg.name, run.step, path)
        summary["already_complete"] = True
    elif run.chief:
        storage.write_text(path, json.dumps(summary, indent=1))
    return summary


def tree_digest(tree) -> str:
    """sha256 of a pytree's bytes (gathered across processes), for bitwise equality checks."""
    from jax.experimental import multihost_utils

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        arr = leaf if leaf.is_fully_addressable else multihost_utils.process_allgather(leaf, tiled=True)
        h.update(np.ascontiguousarray(np.asarray(jax.device_get(arr))).tobytes())
    return h.hexdigest()

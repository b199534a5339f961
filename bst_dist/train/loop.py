"""The training loop: one function, `train(cfg)`, run by every JAX process of a job (under Ray
Train or directly). A straight line: mesh -> data -> state -> resume -> steps -> checkpoints.

It assumes `jax.distributed.initialize` was already called when there are several processes
(bst_dist.launch does that); the global mesh spans `jax.devices()`, and each process feeds only
its own data lanes. Rerunning the same job resumes from the newest complete checkpoint: same
data position, same cache, same loss curve.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from typing import Callable

import jax
import numpy as np
import yaml

from bst_dist import config as config_lib
from bst_dist import parallel
from bst_dist.config import ConfigError, JobConfig
from bst_dist.flops import train_step_flops
from bst_dist.train import state as state_lib
from bst_dist.train.checkpoint import Checkpointer, NoReadableCheckpoint, check_compatible
from bst_dist.train.metrics import MetricsLogger, device_peak_flops, mfu
from bst_dist.train.preemption import PREEMPTED_EXIT_CODE, PreemptionGuard, any_process
from bst_dist.train.step import BATCH_KEYS, batch_shardings, make_train_step

log = logging.getLogger("bst_dist.train")


class TrainingError(RuntimeError):
    """The run stopped itself (e.g. too many non-finite steps in a row); a checkpoint was saved."""


def checkpoint_dir(cfg: JobConfig) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.train.run_dir, "checkpoints")


def check_batch(cfg: JobConfig, mesh) -> None:
    """Refuse, before any compilation, a batch the mesh or the processes cannot split."""
    B, A = cfg.train.global_batch_size, cfg.train.grad_accum
    n = parallel.batch_axis_size(mesh, parallel.rules_from_config(cfg.mesh))
    P = jax.process_count()
    if B % P:
        raise ConfigError(f"train.global_batch_size: {B} is not divisible by the {P} processes (each owns B/P lanes)")
    if (B // A) % n:
        what = f"global_batch_size / grad_accum = {B // A}" if A > 1 else f"global_batch_size {B}"
        raise ConfigError(f"train.global_batch_size: {what} is not divisible by the data-parallel size "
                          f"(data x fsdp = {n})")


def check_resumable(ckpt: Checkpointer, cfg: JobConfig) -> None:
    """Refuse the newest checkpoint when the job cannot continue from it (IncompatibleCheckpoint
    naming the difference), before the data, the model or any compilation. The restore checks
    each candidate again; an unreadable newest step is left to its fallback."""
    latest = ckpt.latest_step()
    if latest is None:
        return
    try:
        meta = ckpt.read_meta(latest)
    except NoReadableCheckpoint:
        return
    check_compatible(meta, config_lib.to_dict(cfg), source=ckpt.directory)


def global_batch(local: dict, shardings: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(local[k])) for k in BATCH_KEYS}


def tree_digest(tree) -> str:
    """sha256 of a pytree's bytes (gathered across processes), for bitwise equality checks."""
    from jax.experimental import multihost_utils

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        arr = leaf if leaf.is_fully_addressable else multihost_utils.process_allgather(leaf, tiled=True)
        h.update(np.ascontiguousarray(np.asarray(jax.device_get(arr))).tobytes())
    return h.hexdigest()


def write_job(cfg: JobConfig) -> None:
    os.makedirs(cfg.train.run_dir, exist_ok=True)
    with open(os.path.join(cfg.train.run_dir, "job.yaml"), "w") as f:
        yaml.safe_dump(config_lib.to_dict(cfg), f, sort_keys=False)


def train(cfg: JobConfig, *, report: Callable[[dict], None] | None = None,
          stop: threading.Event | None = None) -> dict:
    """Train (or resume) the job in this process; returns a summary on every process.

    report: called every step on every process with the step's metrics (Ray's report hook).
    stop: set by another thread to ask for a checkpoint and exit, like SIGTERM (Ray workers run
    this function on a thread that cannot install signal handlers)."""
    from data_pipelines import make_loader

    t_start = time.time()
    chief = jax.process_index() == 0
    mesh = parallel.make_mesh(cfg.mesh)
    check_batch(cfg, mesh)
    m, t = cfg.model, cfg.train
    B, total = t.global_batch_size, t.steps
    ckpt = Checkpointer(checkpoint_dir(cfg), every=cfg.checkpoint.every, keep_last=cfg.checkpoint.keep_last,
                        keep_every=cfg.checkpoint.keep_every, async_save=cfg.checkpoint.async_save)
    try:
        check_resumable(ckpt, cfg)
    except BaseException:
        ckpt.close()
        raise
    if chief:
        write_job(cfg)  # only now: a refused rerun must not overwrite the job.yaml of the checkpoints

    loader = make_loader(cfg.data, seq_len=m.seq_len, global_batch_size=B, process_index=jax.process_index(),
                         process_count=jax.process_count(), split="train", seed=t.seed)
    start, tokens_seen = 0, 0
    if ckpt.latest_step() is not None:
        # restore straight into the shardings, with no parameter init to compile and run first
        # (on a GPU compiling the init of a 200M BST takes minutes)
        setup, abstract_state, _ = state_lib.plan(cfg, mesh)
        state, cache, meta, start = ckpt.restore(abstract_state=abstract_state,
                                                 abstract_cache=setup.abstract_cache(), data_iter=loader,
                                                 job_config=config_lib.to_dict(cfg))
        tokens_seen = int(meta.get("tokens_seen", 0))
        log.info("resumed from %s step %d", ckpt.directory, start)
    else:
        setup, state, cache = state_lib.create(cfg, mesh)
    logger = MetricsLogger(t.run_dir, is_chief=chief, total_steps=total, log_every=t.log_every)
    logger.truncate_after(start)
    step_fn = make_train_step(setup)
    shardings = batch_shardings(setup)
    flops = train_step_flops(m, B)
    peak = device_peak_flops(jax.devices()[0])
    evaluator = None
    if t.eval_every:
        from bst_dist.evaluate import StreamEvaluator

        evaluator = StreamEvaluator(setup, split="validation", max_batches=t.eval_batches)

    def meta(step: int) -> dict:
        return {"config": config_lib.to_dict(cfg), "tokens_seen": tokens_seen, "step": step}

    losses: list[float] = []
    nan_streak, ckpt_time = 0, 0.0
    if chief:
        log.info("training %s: %d devices, mesh %s, steps %d..%d, %.1fs to first step", cfg.name, jax.device_count(),
                 dict(mesh.shape), start, total, time.time() - t_start)
    try:
        with PreemptionGuard(event=stop) as guard:
            for step in range(start, total):
                t0 = time.perf_counter()
                batch = global_batch(next(loader), shardings)
                t1 = time.perf_counter()
                state, cache, out = step_fn(state, cache, batch)
                out = jax.device_get(out)
                t2 = time.perf_counter()
                done = step + 1
                tokens_seen += B * m.seq_len
                loss = float(out["loss"])
                losses.append(loss)
                nan_streak = nan_streak + 1 if out["skipped"] else 0
                record = {"loss": loss, "ppl": float(np.exp(min(loss, 50.0))), "grad_norm": float(out["grad_norm"]),
                          "tokens_per_sec": B * m.seq_len / (t2 - t0), "mfu": mfu(flops, t2 - t1, jax.device_count(), peak),
                          "step_time": t2 - t0, "data_time": t1 - t0, "ckpt_time": ckpt_time,
                          "tokens_seen": tokens_seen, "skipped": int(out["skipped"])}
                logger.log(done, record)
                if report is not None:
                    report({"step": done, **record})
                t3 = time.perf_counter()
                ckpt.save(done, state=state, cache=cache, data_iter=loader, meta=meta(done), force=done == total)
                ckpt_time = time.perf_counter() - t3
                if evaluator is not None and done % t.eval_every == 0:
                    logger.log_eval(done, evaluator.run(state["params"]))
                if any_process(guard.requested):
                    ckpt.save(done, state=state, cache=cache, data_iter=loader, meta=meta(done), force=True)
                    ckpt.wait()
                    log.warning("preempted: saved step %d; exiting with status %d", done, PREEMPTED_EXIT_CODE)
                    raise SystemExit(PREEMPTED_EXIT_CODE)
                if nan_streak > t.max_nan_steps:
                    ckpt.save(done, state=state, cache=cache, data_iter=loader, meta=meta(done), force=True)
                    ckpt.wait()
                    raise TrainingError(f"{nan_streak} non-finite steps in a row (train.max_nan_steps="
                                        f"{t.max_nan_steps}); saved step {done}; lower the learning rate or check the data")
        ckpt.wait()
    finally:
        ckpt.close()
        logger.close()
        loader.close()
    summary = {"final_step": total, "start_step": start, "losses": losses, "run_dir": t.run_dir,
               "tokens_seen": tokens_seen, "params_digest": tree_digest(state["params"]),
               "opt_state_digest": tree_digest(state["opt_state"]), "cache_digest": tree_digest(cache)}
    if chief:
        with open(os.path.join(t.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        try:
            from bst_dist.plot import plot_run

            plot_run(t.run_dir)
        except Exception as e:  # noqa: BLE001 - plots are a convenience, never fail the run
            log.warning("plot skipped: %s", e)
    return summary

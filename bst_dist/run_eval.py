"""Evaluate a run directory's checkpoint (the library side of `bst-dist eval`)."""

from __future__ import annotations

import json
import os

import yaml

from bst_dist import config as config_lib
from bst_dist import parallel


def load_run_config(run_dir: str, overrides: list[str] | None = None) -> config_lib.JobConfig:
    from bst_dist.cli import UserError

    path = os.path.join(run_dir, "job.yaml")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir}: not a run directory (no job.yaml); pass the train.run_dir of a job")
    with open(path) as f:
        return config_lib.from_dict(yaml.safe_load(f), overrides)


def evaluate_run(run_dir: str, *, split: str = "validation", lengths: list[int] = (), max_batches: int = 0,
                 max_docs: int = 0, step: int | None = None, overrides: list[str] | None = None) -> dict:
    from bst_dist.evaluate import StreamEvaluator, eval_at_length
    from bst_dist.train import state as state_lib
    from bst_dist.train.checkpoint import Checkpointer
    from bst_dist.train.loop import checkpoint_dir

    cfg = load_run_config(run_dir, overrides)
    mesh = parallel.make_mesh(cfg.mesh)
    setup, state, _ = state_lib.create(cfg, mesh)
    ckpt = Checkpointer(checkpoint_dir(cfg), every=cfg.checkpoint.every, keep_last=cfg.checkpoint.keep_last)
    try:
        state, meta, step = ckpt.restore_state(abstract_state=setup.abstract_state(state), step=step)
    finally:
        ckpt.close()
    params = state["params"]
    result = {"run_dir": run_dir, "step": step, "split": split,
              "streamed": StreamEvaluator(setup, split=split, max_batches=max_batches).run(params)}
    result["at_length"] = [eval_at_length(setup, params, T, split=split, max_docs=max_docs) for T in lengths]
    with open(os.path.join(run_dir, f"eval_{split}_step{step}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result

"""Evaluate a run directory's checkpoint (the library side of `bst-dist eval`): the parameters
alone are restored (no optimizer is built), then both evaluation modes run on the job's mesh."""

from __future__ import annotations

import json
import os

from bst_dist import parallel
from bst_dist.runs.files import load_run_config


def evaluate_run(run_dir: str, *, split: str = "validation", lengths: list[int] = (), max_batches: int = 0,
                 max_docs: int = 0, step: int | None = None, overrides: list[str] | None = None) -> dict:
    from bst_dist.eval.evaluators import StreamEvaluator, eval_at_length
    from bst_dist.train.loop import open_checkpointer
    from bst_dist.train.state import initial_state

    run_dir = os.path.abspath(run_dir)
    cfg = load_run_config(run_dir, overrides)
    mesh = parallel.make_mesh(cfg.mesh)
    with open_checkpointer(cfg) as ckpt:
        start = initial_state(cfg, mesh, ckpt, optimizer=False, step=step)
    setup, params = start.setup, start.state["params"]
    result = {"run_dir": run_dir, "step": start.step, "split": split,
              "streamed": StreamEvaluator(setup, split=split, max_batches=max_batches).run(params)}
    result["at_length"] = [eval_at_length(setup, params, T, split=split, max_docs=max_docs) for T in lengths]
    with open(os.path.join(run_dir, f"eval_{split}_step{start.step}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result

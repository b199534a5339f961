"""Evaluate trained parameters (the library side of `bst-dist eval`): a run directory's checkpoint,
or an export with a job file naming the data. The parameters alone are restored (no optimizer is
built), then both evaluation modes run on the job's mesh."""

from __future__ import annotations

import json
import logging
import os
import time

from bst_dist import config as config_lib
from bst_dist import parallel
from bst_dist.errors import UserError
from bst_dist.runs.files import load_run_config

log = logging.getLogger("bst_dist.eval")


def _export_job(export_dir: str, job: str | None, overrides: list[str] | None) -> config_lib.JobConfig:
    """The job file's data and mesh with the export's model."""
    if not job:
        raise UserError(f"{export_dir}: an export holds parameters only; pass --job JOB.yaml for the data "
                        "to evaluate on (its model section is replaced by the export's)")
    with open(os.path.join(export_dir, "export.json")) as f:
        model = json.load(f)["model"]
    raw = config_lib.to_dict(config_lib.load(job))
    raw["model"] = model
    return config_lib.from_dict(raw, overrides)


def evaluate_run(run_dir: str, *, split: str = "validation", lengths: list[int] = (), max_batches: int = 0,
                 max_docs: int = 0, max_windows: int = 0, step: int | None = None, overrides: list[str] | None = None,
                 job: str | None = None) -> dict:
    """`run_dir`: a run directory (its newest checkpoint, or `step`) or an export (with `job`).
    Writes eval_<split>_step<N>.json beside the parameters and returns the same dict."""
    from bst_dist.eval.evaluators import StreamEvaluator, eval_at_length
    from bst_dist.generate.params import is_export, load_init_params
    from bst_dist.train.loop import open_checkpointer
    from bst_dist.train.state import initial_state, plan

    run_dir = os.path.abspath(run_dir)
    if is_export(run_dir):
        cfg = _export_job(run_dir, job, overrides)
        mesh = parallel.make_mesh(cfg.mesh)
        setup, abstract, _ = plan(cfg, mesh, optimizer=False)
        params = load_init_params(run_dir, cfg.model, abstract["params"])
        with open(os.path.join(run_dir, "export.json")) as f:
            at_step = json.load(f).get("step")
    else:
        cfg = load_run_config(run_dir, overrides)
        mesh = parallel.make_mesh(cfg.mesh)
        with open_checkpointer(cfg) as ckpt:
            start = initial_state(cfg, mesh, ckpt, optimizer=False, step=step)
        setup, params, at_step = start.setup, start.state["params"], start.step
    log.info("evaluating step %s on the %s split: streamed (%s batches), then at lengths %s", at_step, split,
             max_batches or "all", list(lengths) or "none")
    t0 = time.perf_counter()
    result = {"run_dir": run_dir, "step": at_step, "split": split,
              "streamed": StreamEvaluator(setup, split=split, max_batches=max_batches).run(params)}
    log.info("streamed: ppl %.3f over %d tokens (%.0f s)", result["streamed"]["eval_ppl"],
             result["streamed"]["eval_tokens"], time.perf_counter() - t0)
    window = max(lengths, default=0)  # every T scores the same windows of this many tokens
    result["at_length"] = []
    for T in lengths:
        t0 = time.perf_counter()
        r = eval_at_length(setup, params, T, split=split, window=window, max_windows=max_windows, max_docs=max_docs)
        log.info("T=%d: ppl %.3f over %d tokens (%.0f s)", T, r["ppl"], r["tokens"], time.perf_counter() - t0)
        result["at_length"].append(r)
    with open(os.path.join(run_dir, f"eval_{split}_step{at_step}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result

"""What a run directory holds and how to read its job: `job.yaml` (the resolved job spec the run
was started with), `checkpoints/`, `metrics.jsonl`, `eval.jsonl`, `summary.json`, `plots/`."""

from __future__ import annotations

import os

import yaml

from bst_dist import config as config_lib
from bst_dist.errors import UserError


def load_run_config(run_dir: str, overrides: list[str] | None = None) -> config_lib.JobConfig:
    """The job a run directory was trained with (relative paths in it resolve as they did then)."""
    path = os.path.join(run_dir, "job.yaml")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir}: not a run directory (no job.yaml); pass the train.run_dir of a job")
    with open(path) as f:
        # the directory as given now, not as it was when the run started (it may have moved)
        return config_lib.from_dict(yaml.safe_load(f), [f"train.run_dir={os.path.abspath(run_dir)}", *(overrides or [])])

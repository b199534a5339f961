"""The Weights & Biases run of a training run (`wandb` in train.loggers), on the chief only.

One W&B run per run directory: its id is kept in `<run_dir>/wandb_run_id`, so a resumed run
continues the same W&B run (`resume="allow"`). W&B keeps a run's history append-only; a resumed
run re-does the steps after its checkpoint, which W&B already holds with the same values (the
resume is exact), so steps below the W&B run's current step are not sent again.

wandb's own banners and its capture of stdout/stderr are off: the progress line stays ours.
`WANDB_MODE=offline` (or `train.wandb.mode: offline`) writes the run under `$WANDB_DIR` (else
the run directory) for a later `wandb sync`.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from bst_dist.config import WandbConfig
from bst_dist.errors import UserError

ID_FILE = "wandb_run_id"
MISSING = "train.loggers: wandb is not installed; install the extra: pip install 'bst-dist[wandb]'"


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise UserError(MISSING) from None
    return wandb


def check_installed() -> None:
    """The one-line refusal, before a job that logs to W&B starts (the launcher calls it)."""
    _import_wandb()


def _run_id(run_dir: str) -> str:
    path = os.path.join(run_dir, ID_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(6)  # W&B run ids: lowercase letters and digits
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(run_id + "\n")
    return run_id


class WandbRun:
    """`log(prefix, step, record)` sends the numeric values as `prefix/key` at `step`."""

    def __init__(self, run_dir: str, settings: WandbConfig, *, job_name: str, config: dict | None = None):
        wandb = _import_wandb()
        self._run = wandb.init(
            project=settings.project or os.environ.get("WANDB_PROJECT") or job_name,
            entity=settings.entity, mode=settings.mode, tags=list(settings.tags) or None,
            name=settings.name or os.path.basename(os.path.normpath(run_dir)), id=_run_id(run_dir),
            resume="allow", dir=os.environ.get("WANDB_DIR") or run_dir, config=config,
            settings=wandb.Settings(console="off", silent=True))
        self._first = int(self._run.step or 0)  # a resumed W&B run holds the steps before this one

    def log(self, prefix: str, step: int, record: dict[str, Any]) -> None:
        if step < self._first:
            return
        values = {f"{prefix}/{k}": v for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self._run.log(values, step=int(step))

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
            # finish() returns before wandb's service has closed the run's stream: the .wandb
            # file may still be unwritten when it returns, and a Ray worker is ended without
            # the atexit hook that would flush it. Tear the service down now (it writes and
            # closes every stream), unless the process holds another run of its own.
            wandb = _import_wandb()
            if wandb.run is None:
                wandb.teardown()

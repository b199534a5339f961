"""The training function a job runs by default: the loop of `train/loop.py` with the hooks that
sit above training (streamed evaluation every `train.eval_every` steps, plots at the end)."""

from __future__ import annotations

import threading
from typing import Callable

from bst_dist.config import JobConfig


def train_job(cfg: JobConfig, *, report: Callable[[dict], None] | None = None,
              stop: threading.Event | None = None) -> dict:
    from bst_dist.eval.hook import Evaluate
    from bst_dist.runs.plot import PlotHook
    from bst_dist.train.loop import train

    return train(cfg, report=report, stop=stop, hooks=[Evaluate(), PlotHook()])

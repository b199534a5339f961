"""Streamed evaluation every `train.eval_every` steps during training (into eval.jsonl)."""

from __future__ import annotations

import time

from bst_dist.eval.evaluators import StreamEvaluator
from bst_dist.train.hooks import Hook, Run


class Evaluate(Hook):
    def on_start(self, run: Run) -> None:
        t = run.cfg.train
        self.evaluator = StreamEvaluator(run.setup, split="validation", max_batches=t.eval_batches) \
            if t.eval_every else None

    def after_step(self, run: Run) -> None:
        if self.evaluator is not None and run.step % run.cfg.train.eval_every == 0:
            t0 = time.perf_counter()
            run.logger.log_eval(run.step, self.evaluator.run(run.state["params"]))
            run.exclude(time.perf_counter() - t0)  # not step time

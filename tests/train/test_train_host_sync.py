"""Between log steps the loop never waits for the device: a real tiny run with train.log_every=4
runs its steps under a transfer guard (on an accelerator, a device-to-host copy there fails the
run; CPU arrays live on the host, so there) and checks that, when each such step's hooks have
run, the step's metrics are still being computed: a loop that read them (or blocked on the
state) would see them ready. The metrics of every step still reach metrics.jsonl, fetched at the
log steps."""

from __future__ import annotations

import json

import jax
import pytest

from bst_dist.train.hooks import Hook
from tests.helpers.runs import make_cfg, metrics_lines
from tests.helpers.tiny import job_dict

STEPS, LOG_EVERY = 8, 4


class GuardBetweenLogSteps(Hook):
    """Runs last: after step N's hooks it sets the guard for step N+1 (its dispatch and hooks):
    transfers allowed on log steps (the fetch) and save steps, refused on the others."""

    def on_start(self, run) -> None:
        self.guard, self.unready, self.guarded = None, [], []

    def _release(self) -> None:
        if self.guard is not None:
            self.guard.__exit__(None, None, None)
            self.guard = None

    def after_step(self, run) -> None:
        if self.guard is not None:
            self.guarded.append(run.step)
            # the hooks of this step did not wait for its computation
            self.unready.append(not run.pending[-1]["out"]["loss"].is_ready())
        self._release()
        nxt = run.step + 1
        if nxt % LOG_EVERY and nxt < STEPS and not run.ckpt.should_save(nxt):
            self.guard = jax.transfer_guard_device_to_host("disallow_explicit")
            self.guard.__enter__()

    def on_end(self, run, ok: bool) -> None:
        self._release()


@pytest.mark.slow  # a whole run with its own compilation cache: ~2 min on the 2-core CPU
def test_steps_between_log_steps_do_not_wait_for_the_device(tmp_path):
    from bst_dist.train.loop import train

    spy = GuardBetweenLogSteps()
    job = job_dict(train={"steps": STEPS, "log_every": LOG_EVERY}, checkpoint={"every": 4, "keep_last": 2})
    cfg = make_cfg(job, tmp_path / "run", [f"train.compile_cache={tmp_path / 'jax_cache'}"])
    summary = train(cfg, hooks=[spy])
    assert spy.guarded == [2, 3, 5, 6, 7], spy.guarded  # step 1 (the first) and 4, 8 are fetch steps
    assert all(spy.unready), dict(zip(spy.guarded, spy.unready))
    records = [json.loads(line) for line in metrics_lines(tmp_path / "run")]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == summary["losses"]
    assert all(r["loss"] > 0 and r["step_time"] > 0 for r in records)

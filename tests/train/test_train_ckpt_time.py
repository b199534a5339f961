"""`ckpt_time` is the loop's checkpoint stall on the step that causes it: a save step reports the
time its save held the loop (copying the state to the host, waiting for the previous save), and
a step without a save reports next to nothing."""

from __future__ import annotations

import json

from tests.helpers.runs import metrics_lines


def test_save_steps_report_their_stall_and_other_steps_none(tiny_reference):
    run_dir, _ = tiny_reference  # 6 steps, async saves at 2, 4 and 6
    ckpt = {r["step"]: r["ckpt_time"] for r in map(json.loads, metrics_lines(run_dir))}
    assert sorted(ckpt) == [1, 2, 3, 4, 5, 6]
    saves, others = [ckpt[s] for s in (2, 4, 6)], [ckpt[s] for s in (1, 3, 5)]
    assert min(saves) > 1e-3, ckpt
    assert max(others) < min(saves) / 4, ckpt

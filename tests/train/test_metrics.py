"""Metrics a person watches: JSONL, resume truncation, the plain progress line, MFU, plots."""

import io
import json
import math
import os
import re
import types

import jax.numpy as jnp
import numpy as np
import pytest

from bst_dist.train.metrics import MetricsLogger, device_peak_flops, format_duration, mfu


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _run(run_dir, steps, *, resume_from=None, stream=None, log_every=2, total=6):
    logger = MetricsLogger(run_dir, is_chief=True, total_steps=total, log_every=log_every, tty=False,
                           stream=stream or io.StringIO())
    if resume_from is not None:
        logger.truncate_after(resume_from)
    for step in steps:
        logger.log(step, {"loss": jnp.float32(6.0 - 0.5 * step), "tokens_per_sec": 1000.0 * step,
                          "step_time": np.float64(0.25), "data_time": 0.001, "ckpt_time": 0.0,
                          "mfu": float("nan"), "tokens": jnp.int32(64 * step)})
    logger.close()
    return logger


def test_jsonl_one_line_per_step(tmp_path):
    _run(str(tmp_path), range(1, 4))
    rows = _read(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["loss"] == 5.0 and rows[1]["tokens"] == 128 and isinstance(rows[1]["tokens"], int)
    assert math.isclose(rows[1]["ppl"], math.exp(5.0), rel_tol=1e-6)
    assert rows[1]["mfu"] is None  # nan is not JSON
    assert os.listdir(tmp_path / "tb")  # TensorBoard events written


def test_resume_truncation_equals_uninterrupted_run(tmp_path):
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    _run(straight, range(1, 7))
    # First attempt got to step 5 (and a half-written line), checkpoint was at step 3.
    _run(resumed, range(1, 6))
    with open(os.path.join(resumed, "metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "lo')
    _run(resumed, range(4, 7), resume_from=3)
    assert _read(os.path.join(resumed, "metrics.jsonl")) == _read(os.path.join(straight, "metrics.jsonl"))


def test_plain_lines_when_not_a_tty(tmp_path):
    out = io.StringIO()
    _run(str(tmp_path), range(1, 6), stream=out, log_every=2, total=5)
    lines = out.getvalue().splitlines()
    assert [l.split()[1] for l in lines] == ["2/5", "4/5", "5/5"]  # every 2 steps and the last
    assert re.fullmatch(r"step 4/5 loss 4\.000 ppl 54\.6 tok/s 4,000 step 0\.25s data 0\.001s ckpt 0\.000s "
                        r"eta \d+s", lines[1]), lines[1]
    assert "mfu" not in lines[1]  # unknown peak: omitted rather than shown as nan


def test_non_chief_does_nothing(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path / "run"), is_chief=False, total_steps=4, log_every=1, tty=False)
    logger.log(1, {"loss": 1.0})
    logger.truncate_after(0)
    logger.close()
    assert not os.path.exists(tmp_path / "run") and capsys.readouterr().out == ""


def test_peak_flops_and_mfu(monkeypatch):
    monkeypatch.delenv("BST_DIST_PEAK_FLOPS", raising=False)
    kind = lambda k: types.SimpleNamespace(device_kind=k)  # noqa: E731
    assert device_peak_flops(kind("NVIDIA H100 80GB HBM3")) == 989e12
    assert device_peak_flops(kind("NVIDIA H200")) == 989e12
    assert device_peak_flops(kind("NVIDIA A100-SXM4-80GB")) == 312e12
    assert device_peak_flops(kind("TPU v4")) == 275e12
    assert device_peak_flops(kind("TPU v5 lite")) == 197e12
    assert device_peak_flops(kind("TPU v5")) == 459e12
    assert device_peak_flops(kind("TPU v6 lite")) == 918e12
    assert device_peak_flops(kind("cpu")) is None
    monkeypatch.setenv("BST_DIST_PEAK_FLOPS", "1e12")
    assert device_peak_flops(kind("cpu")) == 1e12
    assert mfu(4e12, 0.5, 8, 1e12) == pytest.approx(1.0)
    assert math.isnan(mfu(4e12, 0.5, 8, None))
    assert format_duration(62) == "1m02s" and format_duration(7380) == "2h03m"


def test_plot_writes_pngs(tmp_path):
    from bst_dist.commands.main import main
    from bst_dist.errors import UserError
    from bst_dist.runs.plot import plot_run

    run = tmp_path / "run"
    _run(str(run), range(1, 7))
    with open(run / "eval.jsonl", "w") as f:
        for step in (3, 6):
            f.write(json.dumps({"step": step, "eval_loss": 5.0 - step / 10, "eval_ppl_0-4k": 150.0}) + "\n")
    paths = plot_run(str(run))
    names = sorted(os.path.basename(p) for p in paths)
    assert {"loss.png", "perplexity.png", "tokens_per_sec.png", "eval.png"} <= set(names)
    for p in paths:
        assert os.path.dirname(p) == str(run / "plots")
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    assert main(["plot", str(run), "--out", str(tmp_path / "out")]) == 0
    assert os.path.exists(tmp_path / "out" / "loss.png")
    with pytest.raises(UserError, match="no such run directory"):
        plot_run(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2  # one-line error, no traceback

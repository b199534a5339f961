"""The progress line marks a step skipped for a non-finite loss (train.max_nan_steps), on every
such step, with the count so far, also between two `train.log_every` lines; the TTY bar shows it."""

import io

from bst_dist.train.metrics import MetricsLogger


def _log(run_dir, records, *, tty: bool, log_every: int = 1) -> str:
    out = io.StringIO()
    with MetricsLogger(str(run_dir), is_chief=True, total_steps=len(records), log_every=log_every, tty=tty,
                       stream=out, loggers=("jsonl",)) as logger:
        for step, (loss, skipped) in enumerate(records, 1):
            logger.log(step, {"loss": loss, "skipped": skipped, "tokens_per_sec": 100.0, "step_time": 0.5})
    return out.getvalue()


def test_plain_lines_mark_every_skipped_step_with_the_count(tmp_path):
    nan = float("nan")
    records = [(3.0, 0), (2.9, 0), (nan, 1), (2.8, 0), (nan, 1), (2.7, 0)]
    lines = _log(tmp_path, records, tty=False, log_every=4).splitlines()
    # steps 4 (log_every) and 6 (the last), and the skipped steps 3 and 5 in between
    assert [line.split()[1] for line in lines] == ["3/6", "4/6", "5/6", "6/6"]
    assert lines[0].startswith("step 3/6 loss non-finite: step skipped (1 so far) tok/s 100 step 0.50s")
    assert lines[2].startswith("step 5/6 loss non-finite: step skipped (2 so far) tok/s 100")
    assert lines[1].startswith("step 4/6 loss 2.800 ppl 16.4 tok/s 100") and "skipped" not in lines[1]
    assert "ppl" not in lines[0]  # no made-up perplexity for a non-finite loss


def test_the_bar_shows_the_skipped_count(tmp_path):
    text = _log(tmp_path, [(3.0, 0), (float("nan"), 1), (2.5, 0)], tty=True)
    final = text.strip().rsplit("\r", 1)[-1]  # the bar as left at the end
    assert final.startswith("100%") and final.endswith("loss 2.500 ppl 12.2 tok/s 100 skipped 1]"), final

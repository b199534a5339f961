"""PNG curves of a run: `bst-dist plot RUN_DIR`.

Reads `<run>/metrics.jsonl` (one JSON object a step, see bst_dist/train/metrics.py) and, when
present, `<run>/eval.jsonl` (objects with "step" and keys like "eval_loss"); writes one PNG a
quantity into `<run>/plots/` (or `out_dir`).
"""

from __future__ import annotations

import logging
import math
import os

from bst_dist import storage
from bst_dist.errors import UserError
from bst_dist.train.metrics import read_jsonl

log = logging.getLogger("bst_dist.train")


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _smooth(ys: list[float]) -> list[float]:
    """Centred moving average (no lag, unlike an EMA), window ~1/30 of the run."""
    half = max(len(ys) // 60, 2)
    sums = [0.0]
    for y in ys:
        sums.append(sums[-1] + y)
    out = []
    for i in range(len(ys)):
        lo, hi = max(0, i - half), min(len(ys), i + half + 1)
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


def _figure(path: str, title: str, ylabel: str, curves: list[tuple[str, list, list, dict]],
            logy: bool = False) -> str | None:
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters; never opens a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, xs, ys, style in curves:
        ax.plot(xs, ys, label=label, **style)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _with_smooth(label: str, xs: list, ys: list, **style) -> list:
    """The raw curve, plus its moving average when it is long enough to be noisy."""
    if len(ys) < 20:
        return [(label, xs, ys, style)]
    return [(label, xs, ys, {"alpha": 0.3, "linewidth": 0.8, **style}),
            (f"{label} (smoothed)", xs, _smooth(ys), {"linewidth": 1.5, **style})]


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write the run's curves as PNGs; returns their paths."""
    if storage.is_url(run_dir) and out_dir is None:  # object storage: plot a local copy, upload plots/
        with storage.mirror(run_dir, pull=("metrics.jsonl", "eval.jsonl")) as local:
            if not os.path.isfile(os.path.join(local, "metrics.jsonl")):
                raise UserError(f"{run_dir}: no metrics.jsonl (has the run logged a step yet?)")
            written = plot_run(local)
            return [storage.join(run_dir, os.path.relpath(p, local).replace(os.sep, "/")) for p in written]
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such run directory")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise UserError(f"{run_dir}: no metrics.jsonl (has the run logged a step yet?)")
    train = read_jsonl(metrics_path)
    eval_path = os.path.join(run_dir, "eval.jsonl")
    evals = read_jsonl(eval_path) if os.path.isfile(eval_path) else []
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.basename(os.path.normpath(run_dir))
    point = {"marker": "o", "linestyle": "-"}

    ppl = _series(train, "ppl")
    if not ppl[0]:
        xs, ys = _series(train, "loss")
        ppl = (xs, [math.exp(min(y, 700.0)) for y in ys])
    eval_ppl = _series(evals, "eval_ppl")
    if not eval_ppl[0]:
        xs, ys = _series(evals, "eval_loss")
        eval_ppl = (xs, [math.exp(min(y, 700.0)) for y in ys])

    written = [
        _figure(os.path.join(out_dir, "loss.png"), f"{name}: loss", "loss (nats/token)",
                _with_smooth("train", *_series(train, "loss")) + [("eval", *_series(evals, "eval_loss"), point)]),
        _figure(os.path.join(out_dir, "perplexity.png"), f"{name}: perplexity", "perplexity",
                _with_smooth("train", *ppl) + [("eval", *eval_ppl, point)], logy=True),
        _figure(os.path.join(out_dir, "tokens_per_sec.png"), f"{name}: throughput", "tokens/s",
                _with_smooth("train", *_series(train, "tokens_per_sec"))),
        _figure(os.path.join(out_dir, "mfu.png"), f"{name}: MFU", "MFU (fraction of peak)",
                _with_smooth("mfu", *_series(train, "mfu"))),
        _figure(os.path.join(out_dir, "step_time.png"), f"{name}: time per step", "seconds",
                [(label, *_series(train, key), {}) for key, label in
                 (("step_time", "step"), ("data_time", "data wait"), ("ckpt_time", "checkpoint stall"))]),
    ]
    # Perplexities (e.g. per position bucket) on a log axis; losses and the rest beside them.
    eval_keys = sorted({k for r in evals for k in r if k != "step" and _series(evals, k)[0]})
    for fname, keys, logy in (("eval.png", [k for k in eval_keys if "ppl" not in k], False),
                              ("eval_ppl.png", [k for k in eval_keys if "ppl" in k], True)):
        if keys:
            written.append(_figure(os.path.join(out_dir, fname), f"{name}: evaluation",
                                   "perplexity" if logy else "value",
                                   [(k, *_series(evals, k), point) for k in keys], logy=logy))
    return [p for p in written if p]


class PlotHook:
    """At the end of a complete run the chief writes its curves (a convenience: never fails it)."""

    def on_start(self, run) -> None: ...

    def after_step(self, run) -> None: ...

    def on_end(self, run, ok: bool) -> None:
        if not (ok and run.chief):
            return
        try:
            plot_run(run.cfg.train.run_dir)
        except Exception as e:  # noqa: BLE001 - plots are a convenience, never fail the run
            log.warning("plot skipped: %s", e)

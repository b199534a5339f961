"""What a person watching a run sees: progress, JSONL, TensorBoard, Weights & Biases, MFU.

Step numbering: log the number of updates completed (1..total_steps), the same number the
checkpoint of that state carries. Resuming from checkpoint step S, `truncate_after(S)` drops
every line with step > S, so metrics.jsonl ends up as an uninterrupted run's.

Metric keys the progress line knows (all optional; others go to JSONL and TensorBoard only):
`loss`, `ppl` (filled in from `loss` when absent), `tokens_per_sec`, `mfu` (a fraction, shown
as %), `step_time`, `data_time`, `ckpt_time` (seconds).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Sequence, TextIO

# bf16 dense peak FLOP/s per device, by a lowercase substring of jax's `device.device_kind`.
# Checked in order: the more specific names first.
_PEAK_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM; "NVIDIA H100 80GB HBM3"
    ("h200", 989e12),  # also GH200
    ("a100", 312e12),
    ("v6 lite", 918e12), ("v6e", 918e12),  # Trillium
    ("v5 lite", 197e12), ("v5e", 197e12),
    ("v5p", 459e12), ("v5", 459e12),  # jax calls v5p "TPU v5"
    ("v4", 275e12),
)

PEAK_FLOPS_ENV = "BST_DIST_PEAK_FLOPS"


def device_peak_flops(device: Any) -> float | None:
    """bf16 peak FLOP/s of one device; None when unknown (CPU). $BST_DIST_PEAK_FLOPS overrides."""
    override = os.environ.get(PEAK_FLOPS_ENV)
    if override:
        try:
            return float(override)
        except ValueError:
            raise ValueError(f"{PEAK_FLOPS_ENV}={override!r}: expected a number of FLOP/s, e.g. 989e12") from None
    kind = str(getattr(device, "device_kind", "")).lower()
    for name, flops in _PEAK_FLOPS:
        if name in kind:
            return flops
    return None


def mfu(model_flops_per_step: float, step_time: float, num_devices: int, peak: float | None) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak; nan when unknown."""
    if not peak or step_time <= 0 or num_devices <= 0:
        return math.nan
    return model_flops_per_step / (step_time * num_devices * peak)


def _scalar(v: Any) -> Any:
    """Python number for JSON (non-finite -> None, so the file stays strict JSON)."""
    if isinstance(v, (bool, str)) or v is None:
        return v
    if getattr(v, "ndim", 0) > 0:  # a per-lane or per-bucket vector
        return [_scalar(x) for x in v.tolist()]
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    if not math.isfinite(f):
        return None
    if isinstance(v, int) or (hasattr(v, "dtype") and str(v.dtype).startswith(("int", "uint"))):
        return int(v)
    return f


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _fields(m: dict, skipped_so_far: int = 0) -> list[str]:
    out = []
    if m.get("skipped"):  # a non-finite step: no update was applied (train.max_nan_steps)
        out.append(f"loss non-finite: step skipped ({skipped_so_far} so far)")
    elif m.get("loss") is not None:
        out.append(f"loss {m['loss']:.3f}")
    if m.get("ppl") is not None and not m.get("skipped"):
        out.append(f"ppl {m['ppl']:.1f}")
    if m.get("tokens_per_sec") is not None:
        out.append(f"tok/s {m['tokens_per_sec']:,.0f}")
    if m.get("mfu") is not None:
        out.append(f"mfu {100 * m['mfu']:.1f}%")
    for key, label in (("step_time", "step"), ("data_time", "data"), ("ckpt_time", "ckpt")):
        if m.get(key) is not None:
            out.append(f"{label} {m[key]:.{2 if key == 'step_time' else 3}f}s")
    return out


def read_jsonl(path: str) -> list[dict]:
    """Records with an integer "step", in step order; lines cut short by a kill are skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                rows.append(rec)
    rows.sort(key=lambda r: r["step"])
    return rows


def _truncate_jsonl(path: str, last_step: int) -> None:
    if not os.path.exists(path):
        return
    kept = [json.dumps(rec) + "\n" for rec in read_jsonl(path) if rec["step"] <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricsLogger:
    """Per-step metrics of the chief process: metrics.jsonl, TensorBoard, W&B (train.loggers), progress.

    On a TTY (stderr) a tqdm bar with loss, tokens/s, MFU and ETA; otherwise a plain line every
    `log_every` steps (and at the last step), e.g.
    `step 40/300 loss 5.123 ppl 168.0 tok/s 12,345 mfu 1.2% step 0.21s data 0.001s ckpt 0.000s eta 1m02s`.
    A skipped (non-finite) step always gets a line, `step 41/300 loss non-finite: step skipped
    (1 so far) tok/s ...`; the bar shows the count.
    Non-chief processes do nothing (and create no files).
    """

    def __init__(self, run_dir: str, *, is_chief: bool, total_steps: int, log_every: int,
                 tty: bool | None = None, stream: TextIO | None = None,
                 loggers: Sequence[str] = ("jsonl", "tensorboard"), wandb: Any = None, job_name: str = "job",
                 job_config: dict | None = None):
        self.run_dir = str(run_dir)
        self.is_chief = is_chief
        self.total_steps = int(total_steps)
        self.log_every = max(int(log_every), 1)
        self._tty = sys.stderr.isatty() if tty is None else tty
        self._stream = stream
        self._purge_step: int | None = None
        self._writer = None
        self._bar = None
        self._files: dict[str, TextIO] = {}
        self._t0: tuple[float, int] | None = None  # (time, step) of the first step logged
        self._skipped = 0  # non-finite steps skipped since this process started the run
        self._mirror = None
        self._use_tensorboard = "tensorboard" in loggers
        self._wandb = None
        if is_chief:
            from bst_dist.storage import Mirror

            # On object storage the files are appended locally and synced on flush (storage/mirror.py).
            self._mirror = Mirror(self.run_dir, pull=("metrics.jsonl", "eval.jsonl", "wandb_run_id"))
            self.run_dir = self._mirror.local
            if "wandb" in loggers:  # opened now: a missing wandb or a refused login stops before the first step
                from bst_dist.config import WandbConfig
                from bst_dist.train.wandb_run import WandbRun

                self._wandb = WandbRun(self.run_dir, wandb or WandbConfig(), job_name=job_name, config=job_config)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.run_dir, "metrics.jsonl")

    @property
    def eval_path(self) -> str:
        return os.path.join(self.run_dir, "eval.jsonl")

    def truncate_after(self, step: int) -> None:
        """Forget everything logged for steps > `step` (the step a resumed run restored)."""
        if not self.is_chief:
            return
        for f in self._files.values():
            f.close()
        self._files.clear()
        for path in (self.metrics_path, self.eval_path):
            _truncate_jsonl(path, step)
        # TensorBoard hides events at steps >= purge_step written by the earlier run.
        self._purge_step = step + 1
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _append(self, path: str, record: dict) -> None:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "a", encoding="utf-8")
        f.write(json.dumps(record) + "\n")
        f.flush()  # a kill loses at most this line
        self._mirror.sync(force=False)

    def _scalars(self, prefix: str, step: int, record: dict) -> None:
        """The numeric values of `record` to TensorBoard and W&B, as `prefix/key` at `step`."""
        if self._wandb is not None:
            self._wandb.log(prefix, step, record)
        if not self._use_tensorboard:
            return
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(self.run_dir, "tb"), purge_step=self._purge_step)
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._writer.add_scalar(f"{prefix}/{k}", v, step)

    def log(self, step: int, metrics: dict) -> None:
        """Record the metrics of `step` (values: numbers, numpy or jax scalars)."""
        if not self.is_chief:
            return
        m = {k: _scalar(v) for k, v in metrics.items()}
        if m.get("loss") is not None and "ppl" not in m:
            m["ppl"] = _scalar(math.exp(min(m["loss"], 700.0)))
        record = {"step": int(step), **m}
        self._append(self.metrics_path, record)
        self._scalars("train", step, record)
        self._progress(int(step), m)

    def log_eval(self, step: int, metrics: dict) -> None:
        """Evaluation results at `step` -> eval.jsonl and TensorBoard (keys like `eval_loss`)."""
        if not self.is_chief:
            return
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        self._append(self.eval_path, record)
        self._scalars("eval", step, record)
        if not self._tty:
            self._print(f"eval step {step} " + " ".join(
                f"{k} {v:.4g}" for k, v in record.items() if k != "step" and isinstance(v, (int, float))))

    def _eta(self, step: int) -> float | None:
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = (now, step)
            return None
        t0, s0 = self._t0
        if step <= s0 or now <= t0:
            return None
        return (self.total_steps - step) * (now - t0) / (step - s0)

    def _print(self, line: str) -> None:
        print(line, file=self._stream or sys.stdout, flush=True)

    def _progress(self, step: int, m: dict) -> None:
        eta = self._eta(step)
        self._skipped += bool(m.get("skipped"))
        fields = _fields(m, self._skipped)
        if self._tty:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total_steps, initial=max(step - 1, 0), unit="step",
                                 dynamic_ncols=True, file=self._stream or sys.stderr)
            shown = fields[:4] if not self._skipped or m.get("skipped") else [*fields[:3], f"skipped {self._skipped}"]
            self._bar.set_postfix_str(" ".join(shown), refresh=False)
            self._bar.update(step - self._bar.n)
            return
        # a skipped step always gets its line: between two log_every lines it would go unseen
        if step % self.log_every == 0 or step >= self.total_steps or m.get("skipped"):
            eta_text = f" eta {format_duration(eta)}" if eta is not None else ""
            self._print(" ".join([f"step {step}/{self.total_steps}", *fields]) + eta_text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._mirror is not None:
            self._mirror.sync()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

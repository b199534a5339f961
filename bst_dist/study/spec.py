"""A study file: runs (each a job file plus `--set`-style overrides) compared under one token
budget, and how they are evaluated (docs/quality.md).

    name: pysrc_4k
    tokens: 30408704            # every run trains this many tokens: train.steps = tokens / (B * L)
    out: runs/study_pysrc_4k    # run dirs, results/<run>.json, report.md, plots/
    param_tolerance: 0.05       # non-embedding parameter counts within 5% (null: only report)
    set: [data.path=...]        # overrides for every run, before the run's own
    eval: {split: test, max_batches: 0, lengths: [512, 4096, 16384, 65536], max_docs: 0}
    runs:
      - {name: slide_s0, label: "Slide:12L", job: base.yaml, set: [train.seed=0]}

Job paths are relative to the study file. Loading resolves and validates every run's job (so a
typo in the last run fails before the first one trains) and derives its steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass

import yaml

from bst_dist import config as config_lib
from bst_dist.errors import UserError
from bst_dist.eval.suite import EvalSpec


class StudyError(UserError, ValueError):
    """A study file that cannot run; one line naming the key."""


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOP_KEYS = ("name", "description", "tokens", "out", "param_tolerance", "set", "eval", "runs")
_RUN_KEYS = ("name", "label", "job", "set")


@dataclass(frozen=True)
class StudyRun:
    name: str
    label: str
    job: str  # absolute path
    overrides: tuple[str, ...]  # study-wide, then the run's own, then the derived ones
    cfg: config_lib.JobConfig

    @property
    def tokens(self) -> int:
        t = self.cfg.train
        return t.steps * t.global_batch_size * self.cfg.model.seq_len


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    path: str
    out: str
    tokens: int
    param_tolerance: float | None
    eval: EvalSpec
    runs: tuple[StudyRun, ...]

    def select(self, only: str | None) -> list[StudyRun]:
        if not only:
            return list(self.runs)
        names = [s.strip() for s in only.split(",") if s.strip()]
        known = [r.name for r in self.runs]
        for n in names:
            if n not in known:
                raise StudyError(f"--only {n}: no such run in {self.path}; runs: {', '.join(known)}")
        return [r for r in self.runs if r.name in names]


def _str_list(value, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise StudyError(f"{key}: expected a list of KEY=VALUE strings, got {value!r}")
    return list(value)


def _eval_spec(raw) -> EvalSpec:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise StudyError(f"eval: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(EvalSpec)}
    kw = {}
    for k, v in raw.items():
        if k not in fields:
            raise StudyError(f"eval.{k}: unknown key; allowed: {', '.join(fields)}")
        if k == "split":
            if not isinstance(v, str):
                raise StudyError(f"eval.split: expected a split name, got {v!r}")
            kw[k] = v
        elif k == "lengths":
            if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
                raise StudyError(f"eval.lengths: expected a list of positive integers, got {v!r}")
            kw[k] = tuple(v)
        else:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise StudyError(f"eval.{k}: expected an integer >= 0, got {v!r}")
            kw[k] = v
    return EvalSpec(**kw)


def _derive_steps(cfg: config_lib.JobConfig, tokens: int, run: str) -> int:
    per_step = cfg.train.global_batch_size * cfg.model.seq_len
    steps, rem = divmod(tokens, per_step)
    if steps < 1 or rem:
        raise StudyError(f"tokens: {tokens:,} is not a positive multiple of run {run}'s tokens per step "
                         f"(global_batch_size x L = {per_step:,}); choose a budget divisible by every run's")
    return steps


def load(path: str, *, out: str | None = None, overrides: list[str] | None = None,
         tokens: int | None = None) -> Study:
    """Read and check a study file; `out`, `overrides` (applied to every run, last) and `tokens`
    (another budget, e.g. a short trial) come from the command line. Raises StudyError or
    ConfigError (one line)."""
    if not os.path.isfile(path):
        raise StudyError(f"{path}: no such study file")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: the top level must be a mapping with runs:")
    for k in raw:
        if k not in _TOP_KEYS:
            raise StudyError(f"{k}: unknown key in {path}; allowed: {', '.join(_TOP_KEYS)}")
    base = os.path.dirname(os.path.abspath(path))
    tokens = raw.get("tokens") if tokens is None else tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise StudyError(f"tokens: expected a positive integer (tokens each run trains), got {tokens!r}")
    tol = raw.get("param_tolerance", 0.05)
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1):
        raise StudyError(f"param_tolerance: expected a fraction in [0, 1) or null, got {tol!r}")
    name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
    out = os.path.abspath(out or raw.get("out") or os.path.join("runs", f"study_{name}"))
    common = _str_list(raw.get("set"), "set")
    runs_raw = raw.get("runs")
    if not isinstance(runs_raw, list) or not runs_raw:
        raise StudyError(f"runs: expected a non-empty list of {{name, job, set}}, got {runs_raw!r}")
    runs, seen = [], set()
    for i, r in enumerate(runs_raw):
        if not isinstance(r, dict):
            raise StudyError(f"runs[{i}]: expected a mapping with name, job and set, got {r!r}")
        for k in r:
            if k not in _RUN_KEYS:
                raise StudyError(f"runs[{i}].{k}: unknown key; allowed: {', '.join(_RUN_KEYS)}")
        rname = r.get("name")
        if not isinstance(rname, str) or not _NAME.match(rname):
            raise StudyError(f"runs[{i}].name: expected a name of letters, digits, '_', '-', '.', got {rname!r}")
        if rname in seen:
            raise StudyError(f"runs[{i}].name: {rname!r} is used twice")
        seen.add(rname)
        job = r.get("job")
        if not isinstance(job, str):
            raise StudyError(f"runs[{i}].job: expected a job file path, got {job!r}")
        job = job if os.path.isabs(job) else os.path.join(base, job)
        if not os.path.isfile(job):
            raise StudyError(f"runs[{i}].job: {job}: no such job file")
        own = [*common, *_str_list(r.get("set"), f"runs[{i}].set"), *(overrides or [])]
        run_dir = os.path.join(out, "runs", rname)
        cfg = config_lib.load(job, [*own, f"train.run_dir={run_dir}"])
        derived = [f"train.steps={_derive_steps(cfg, tokens, rname)}", f"train.run_dir={run_dir}"]
        cfg = config_lib.load(job, [*own, *derived])
        cfg = dataclasses.replace(cfg, name=rname)
        runs.append(StudyRun(rname, str(r.get("label") or rname), job, tuple(own + derived), cfg))
    return Study(name, str(raw.get("description") or ""), os.path.abspath(path), out, tokens,
                 None if tol is None else float(tol), _eval_spec(raw.get("eval")), tuple(runs))


def config_digest(cfg: config_lib.JobConfig) -> str:
    """sha256 of the resolved job without where it is written (run dir, checkpoint dir, name):
    two runs of one configuration have one digest."""
    d = config_lib.to_dict(cfg)
    d.pop("name", None)
    d["train"].pop("run_dir", None)
    d["checkpoint"].pop("dir", None)
    return hashlib.sha256(yaml.safe_dump(d, sort_keys=True).encode()).hexdigest()[:16]

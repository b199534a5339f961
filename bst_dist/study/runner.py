"""Run a study: check the runs are comparable, then train and evaluate each, one JSON per run,
then the report. Resumable: a run whose results/<run>.json exists is skipped; a run killed while
training resumes from its newest checkpoint (the normal job machinery); one killed while
evaluating trains zero steps and is evaluated again.

    <out>/runs/<run>/        the run's directory (job.yaml, checkpoints/, metrics.jsonl, ...)
    <out>/results/<run>.json config digest, parameters, tokens, times, device, losses, evaluation
    <out>/report.md, <out>/plots/*.png
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

from bst_dist import config as config_lib
from bst_dist.study.spec import Study, StudyError, StudyRun, config_digest

log = logging.getLogger("bst_dist.study")
FORMAT = "bst_dist.study_run/1"


def result_path(study: Study, name: str) -> str:
    return os.path.join(study.out, "results", f"{name}.json")


def param_counts(study: Study) -> dict[str, dict]:
    from bst_dist.runs.describe import count_params

    return {r.name: count_params(r.cfg.model) for r in study.runs}


def check_params(study: Study, counts: dict[str, dict]) -> dict:
    """The spread of non-embedding parameter counts over all runs of the study (not only the
    selected ones: a subset must be comparable with the rest); raises past the tolerance."""
    ne = {n: c["non_embedding"] for n, c in counts.items()}
    lo, hi = min(ne, key=ne.get), max(ne, key=ne.get)
    spread = ne[hi] / ne[lo] - 1
    out = {"non_embedding": ne, "spread": spread, "smallest": lo, "largest": hi, "tolerance": study.param_tolerance,
           "within_tolerance": study.param_tolerance is None or spread <= study.param_tolerance}
    if not out["within_tolerance"]:
        raise StudyError(f"param_tolerance: non-embedding parameters differ by {spread:.1%} ({lo}: {ne[lo]:,}, "
                         f"{hi}: {ne[hi]:,}), more than {study.param_tolerance:.0%}; resize the runs "
                         "(bst-dist describe) or set param_tolerance: null to only report")
    return out


def check_tokens(study: Study) -> None:
    for r in study.runs:
        if r.tokens != study.tokens:
            raise StudyError(f"tokens: run {r.name} trains {r.tokens:,} tokens, the study's budget is {study.tokens:,}")


def run_study(study: Study, *, only: str | None = None, no_ray: bool = False, address: str | None = None,
              report: bool = True) -> dict[str, dict]:
    """Train and evaluate the selected runs (skipping finished ones); returns run -> result."""
    selected = study.select(only)
    check_tokens(study)
    counts = param_counts(study)
    params = check_params(study, counts)
    os.makedirs(os.path.join(study.out, "results"), exist_ok=True)
    with open(os.path.join(study.out, "params.json"), "w") as f:
        json.dump(params, f, indent=1)
    results = {}
    for i, run in enumerate(selected):
        path = result_path(study, run.name)
        if os.path.exists(path):
            log.info("study %s: run %s done (%s); skipped", study.name, run.name, path)
            with open(path) as f:
                results[run.name] = json.load(f)
            continue
        log.info("study %s: run %d/%d %s (%s), %d steps", study.name, i + 1, len(selected), run.name, run.label,
                 run.cfg.train.steps)
        results[run.name] = run_one(study, run, counts[run.name], no_ray=no_ray, address=address)
    if report:
        from bst_dist.study.report import write_report

        write_report(study)
    return results


def run_one(study: Study, run: StudyRun, counts: dict, *, no_ray: bool, address: str | None) -> dict:
    from bst_dist import launch

    t0 = time.time()
    summary = launch.train(run.cfg, address=address, no_ray=no_ray)
    train_wall = time.time() - t0
    t1 = time.time()
    if no_ray:
        evaluation = evaluate(run.cfg, study)
    else:  # the Ray workers have given the accelerators back; a child process takes them and frees them
        evaluation = evaluate_in_child(run.cfg, study)
    result = {
        "format": FORMAT, "study": study.name, "run": run.name, "label": run.label, "job": run.job,
        "overrides": list(run.overrides), "config_digest": config_digest(run.cfg),
        "config": config_lib.to_dict(run.cfg),
        "params": {k: v for k, v in counts.items() if k != "per_layer"},
        "tokens": run.tokens, "steps": run.cfg.train.steps,
        "tokens_per_step": run.cfg.train.global_batch_size * run.cfg.model.seq_len,
        "device": device_info(), "train": train_record(run.cfg, summary, train_wall),
        "eval_wall_s": time.time() - t1, "eval": evaluation,
    }
    path = result_path(study, run.name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, allow_nan=False)
    os.replace(tmp, path)  # the JSON is the run's "done" mark: written whole or not at all
    return result


def evaluate(cfg, study: Study) -> dict:
    from bst_dist.eval.suite import evaluate_checkpoint

    return evaluate_checkpoint(cfg, study.eval)


def evaluate_in_child(cfg, study: Study) -> dict:
    out = os.path.join(cfg.train.run_dir, "study_eval.json")
    code = ("import sys; from bst_dist.study.runner import _child_main; _child_main(*sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, study.path, cfg.train.run_dir, out], text=True,
                          capture_output=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise StudyError(f"run {cfg.name}: evaluation failed: {tail}")
    with open(out) as f:
        return json.load(f)


def _child_main(study_path: str, run_dir: str, out: str) -> None:
    import yaml

    from bst_dist.eval.suite import evaluate_checkpoint
    from bst_dist.runs.files import load_run_config
    from bst_dist.study.spec import _eval_spec

    with open(study_path) as f:
        spec = _eval_spec((yaml.safe_load(f) or {}).get("eval"))
    result = evaluate_checkpoint(load_run_config(run_dir), spec)
    with open(out, "w") as f:
        json.dump(result, f, allow_nan=False)


def train_record(cfg, summary, wall: float) -> dict:
    """Loss and time from metrics.jsonl (complete across resumes: a resume rewrites the steps
    after its checkpoint), and this invocation's wall time."""
    from bst_dist.train.metrics import read_jsonl

    rows = [r for r in read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl")) if "loss" in r]
    losses = [r["loss"] for r in rows]
    tail = losses[-max(1, len(losses) // 10):]
    step_time = sum(r.get("step_time", 0.0) for r in rows)
    first = rows[0].get("step_time", 0.0) if rows else 0.0
    s = summary if isinstance(summary, dict) else {}
    return {"final_loss": losses[-1] if losses else None, "final_loss_last10pct": sum(tail) / len(tail) if tail else None,
            "steps_logged": len(rows), "start_step": s.get("start_step"), "resumed": bool(s.get("start_step")),
            "step_time_sum_s": step_time, "first_step_s": first,
            "tokens_per_sec_after_first": (cfg.train.global_batch_size * cfg.model.seq_len * (len(rows) - 1)
                                           / max(step_time - first, 1e-9)) if len(rows) > 1 else None,
            "wall_s": wall}


def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "kind": d.device_kind, "count": jax.device_count(),
            "jax": jax.__version__}

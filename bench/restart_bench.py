"""Start-up and checkpoint costs of a real training run: `bst-dist train --no-ray` processes of one
job (default jobs/pg19_400m.yaml on one device), each timed from its launch.

    python bench/restart_bench.py --out bench/results/h200 --set data.path=/data/pg19
    python bench/restart_bench.py --out /tmp/rb --job jobs/local_tiny.yaml        # CPU smoke test

Phases, each its own process, all sharing one compilation cache under OUT (empty at the start):
  fresh   a new run directory, cold cache: time to the first step, the state's creation
          (parameter init) and the checkpoint stall of each save (`ckpt_time` of save steps)
  resume  a new run directory holding the fresh run's first checkpoint, warm cache: time to the
          first step, the restore, and again the stall of each save
  (--fresh-warm) fresh  again, warm cache: what the cache saves a new run

Writes OUT/restart_bench.json (device, versions, command, per phase: the figures and the process's
INFO lines of its start) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import runner  # noqa: E402

# The job's own values for a few steps on one device; --set overrides any of them.
DEFAULTS = {"jobs/pg19_400m.yaml": ["train.global_batch_size=4", "model.dropout=0.0", "model.attn_dropout=0.0"]}

_STATE = re.compile(r"state (created|restored) in ([0-9.]+)s")
_FIRST = re.compile(r"first step done ([0-9.]+)s after start")


def run_phase(name: str, job: str, run_dir: str, sets: list[str], timeout: int) -> dict:
    env = dict(os.environ, PYTHONPATH=runner.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "bst_dist", "train", "--no-ray", job, *[a for s in sets for a in ("--set", s)],
           "--set", f"train.run_dir={run_dir}"]
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=runner.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, bufsize=1)
    lines, row = [], {"phase": name}
    try:
        for line in p.stdout:  # timestamps as the lines arrive: "after launch" includes imports
            line = line.rstrip("\n")
            lines.append(line)
            m = _STATE.search(line)
            if m:
                row["state"], row["state_s"] = m.group(1), float(m.group(2))
                row["state_ready_after_launch_s"] = time.time() - t0
            m = _FIRST.search(line)
            if m:
                row["first_step_in_process_s"] = float(m.group(1))
                row["first_step_after_launch_s"] = time.time() - t0
        rc = p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
    row["wall_s"] = time.time() - t0
    if rc != 0:
        row["error"] = f"rc={rc}: " + " | ".join(lines[-5:])
        return row
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if x.strip()]
    every = int(next((s.split("=", 1)[1] for s in reversed(sets) if s.startswith("checkpoint.every=")), 0))
    steps = rows  # a new run directory: only this process's steps
    row["steps"] = [r["step"] for r in steps]
    row["save_steps"] = [r["step"] for r in steps if every and r["step"] % every == 0]
    row["ckpt_time_saves_s"] = [r["ckpt_time"] for r in steps if r["step"] in row["save_steps"]]
    row["ckpt_time_other_max_s"] = max([r["ckpt_time"] for r in steps if r["step"] not in row["save_steps"]],
                                       default=None)
    row["step_time_s"] = [r["step_time"] for r in steps]
    row["startup_log"] = [ln for ln in lines if "bst_dist" in ln or "step" in ln][:20]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for restart_bench.json (and its scratch runs)")
    ap.add_argument("--job", default="jobs/pg19_400m.yaml")
    ap.add_argument("--steps", type=int, default=6, help="steps of each run")
    ap.add_argument("--every", type=int, default=2, help="checkpoint.every (the resume starts at this step)")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                    help="more overrides, e.g. data.path=/data/pg19 (repeatable)")
    ap.add_argument("--fresh-warm", action="store_true", help="also a fresh run with the warm cache")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per phase")
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    scratch = os.path.join(out, "restart_bench_runs")
    shutil.rmtree(scratch, ignore_errors=True)
    cache = os.path.join(scratch, "jax_cache")
    sets = [*DEFAULTS.get(a.job, []), f"train.steps={a.steps}", f"checkpoint.every={a.every}",
            f"checkpoint.keep_last={a.steps}", "checkpoint.keep_every=0", "train.eval_every=0",
            f"train.compile_cache={cache}", *a.sets]
    rows = [run_phase("fresh", a.job, os.path.join(scratch, "fresh"), sets, a.timeout)]
    cache_files = len(os.listdir(cache)) if os.path.isdir(cache) else 0
    if "error" not in rows[0]:
        resume_dir = os.path.join(scratch, "resume")
        shutil.copytree(os.path.join(scratch, "fresh", "checkpoints", str(a.every)),
                        os.path.join(resume_dir, "checkpoints", str(a.every)))
        rows.append(run_phase("resume", a.job, resume_dir, sets, a.timeout))
        rows[-1]["new_cache_entries"] = len(os.listdir(cache)) - cache_files
        if a.fresh_warm:
            rows.append(run_phase("fresh-warm", a.job, os.path.join(scratch, "fresh_warm"), sets, a.timeout))
    path = runner.write(out, "restart_bench", {"job": a.job, "overrides": sets, "cache_entries_fresh": cache_files,
                                               "rows": rows})
    for r in rows:
        saves = ", ".join(f"{x:.3f}" for x in r.get("ckpt_time_saves_s", []))
        print(f"{r['phase']:10} first step {r.get('first_step_after_launch_s', float('nan')):7.1f}s after launch  "
              f"state {r.get('state', '?')} in {r.get('state_s', float('nan')):6.1f}s  save stalls [{saves}] s  "
              f"{r.get('error', '')[:200]}")
    print("wrote", path)


if __name__ == "__main__":
    main()

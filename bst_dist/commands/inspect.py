"""`bst-dist inspect RUN_DIR [--json]`: checkpoints, data position, shardings, cache of a run."""

from __future__ import annotations

import json


def add_args(p):
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from bst_dist.runs.inspect import format_inspection, inspect_run

    d = inspect_run(args.run_dir)
    print(json.dumps(d, indent=1) if args.json else format_inspection(d))
    return 0

"""`bst-dist describe JOB.yaml [--json]`: layer stack and parameter counts."""

from __future__ import annotations

import json

from bst_dist.commands.common import add_job_args, load_job


def add_args(p):
    add_job_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    from bst_dist.runs.describe import describe, format_description

    d = describe(load_job(args))
    print(json.dumps(d, indent=2) if args.json else format_description(d))
    return 0

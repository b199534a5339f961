"""`bst-dist describe JOB.yaml [--json] [--resolved]`: layer stack and parameter counts, or the
fully resolved spec (includes merged, overrides applied, every default filled in)."""

from __future__ import annotations

import json

from bst_dist.commands.common import add_job_args, load_job


def add_args(p):
    add_job_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--resolved", action="store_true",
                   help="print the resolved job spec as YAML (with --json: as JSON); it loads back to the same job")


def run(args) -> int:
    from bst_dist import config

    cfg = load_job(args)
    if args.resolved:  # no model is built: nothing but the spec is imported
        print(json.dumps(config.to_dict(cfg), indent=2) if args.json else config.dump(cfg).rstrip("\n"))
        return 0
    from bst_dist.runs.describe import describe, format_description

    d = describe(cfg)
    print(json.dumps(d, indent=2) if args.json else format_description(d))
    return 0

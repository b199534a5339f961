"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse


def add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job spec YAML (jobs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job key, e.g. --set model.d_model=256 (repeatable)")


def load_job(args: argparse.Namespace):
    from bst_dist import config

    return config.load(args.job, args.overrides)

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


def add_submitted_job_args(p: argparse.ArgumentParser) -> None:
    """A submitted Ray job: its id and the job server."""
    p.add_argument("job_id", help="the id `bst-dist submit` or `ray job submit` printed")
    p.add_argument("--address", default=None, metavar="URL",
                   help="job server URL (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS, else http://127.0.0.1:8265)")


def job_server_call(job_id: str, fn, *args, **kwargs):
    """Call a launch.submit function; Ray's errors become one-line user errors naming the job."""
    from bst_dist.errors import UserError

    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        raise UserError(f"job {job_id}: {str(e).splitlines()[0]}") from None


def show_progress_logs() -> None:
    """bst_dist's INFO lines (progress of long commands) on stderr; other libraries' warnings only."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("bst_dist", "data_pipelines"):
        logging.getLogger(name).setLevel(logging.INFO)

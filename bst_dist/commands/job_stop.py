"""`bst-dist stop JOB_ID [--address URL]`: stop a submitted job (its entrypoint gets SIGTERM, so the
training workers are torn down; the next run resumes from the newest checkpoint) and wait until
Ray reports it stopped."""

from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id", help="the id `bst-dist submit` or `ray job submit` printed")
    p.add_argument("--address", default=None, metavar="URL",
                   help="job server URL (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS, else http://127.0.0.1:8265)")


def run(args: argparse.Namespace) -> int:
    from bst_dist.cli import UserError
    from bst_dist.launch import submit

    try:
        status = submit.stop(args.job_id, address=args.address)
    except RuntimeError as e:
        raise UserError(f"job {args.job_id}: {str(e).splitlines()[0]}") from None
    print(f"{args.job_id}: {status}")
    return 0

"""`bst-dist stop JOB_ID [--address URL]`: stop a submitted job (its entrypoint gets SIGTERM, so the
training workers are torn down; the next run resumes from the newest checkpoint) and wait until
Ray reports it stopped."""

from __future__ import annotations

import argparse

from bst_dist.commands.common import add_submitted_job_args as add_args, job_server_call  # noqa: F401


def run(args: argparse.Namespace) -> int:
    from bst_dist.launch import submit

    status = job_server_call(args.job_id, submit.stop, args.job_id, address=args.address)
    print(f"{args.job_id}: {status}")
    return 0

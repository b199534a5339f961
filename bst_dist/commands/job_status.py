"""`bst-dist status JOB_ID [--address URL]`: the status of a submitted job (PENDING, RUNNING,
SUCCEEDED, FAILED, STOPPED) and Ray's message about it."""

from __future__ import annotations

import argparse

from bst_dist.commands.common import add_submitted_job_args as add_args, job_server_call  # noqa: F401


def run(args: argparse.Namespace) -> int:
    from bst_dist.launch import submit

    status, message = job_server_call(args.job_id, submit.status, args.job_id, address=args.address)
    print(f"{args.job_id}: {status}" + (f" ({message})" if message else ""))
    return 0

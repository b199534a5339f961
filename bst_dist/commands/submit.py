"""`bst-dist submit JOB.yaml [--set K=V ...] [--address URL] [--working-dir DIR] [--no-wait]`: submit
a training job to a Ray cluster's job server, with the working dir, runtime_env and entrypoint
resources from the job's `ray:` section (bst_dist.launch.submit). Streams the job's logs and
exits with its final status: 0 SUCCEEDED, 1 FAILED, 3 STOPPED (130 if you stop following)."""

from __future__ import annotations

import argparse

from bst_dist.commands.common import add_job_args, load_job


def add_args(p: argparse.ArgumentParser) -> None:
    add_job_args(p)
    p.add_argument("--address", default=None, metavar="URL",
                   help="job server (dashboard) URL, e.g. http://127.0.0.1:8265 (default: "
                        "$RAY_API_SERVER_ADDRESS or $RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.add_argument("--working-dir", default=None, metavar="DIR",
                   help="directory uploaded as the job's working_dir (default: ray.runtime_env.working_dir, else .)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")


def run(args: argparse.Namespace) -> int:
    from bst_dist.launch import submit

    cfg = load_job(args)  # validates the job here, before anything is uploaded
    return submit.submit(cfg, args.job, args.overrides, address=args.address, working_dir=args.working_dir,
                         wait=not args.no_wait)

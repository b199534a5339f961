"""`bst-dist train JOB.yaml [--set K=V ...] [--address ADDR | --workers N | --no-ray]`: train a job
under Ray Train (bst_dist.launch.train). With no address (--address, $RAY_ADDRESS, ray.address) it
starts an embedded Ray bound to 127.0.0.1 and stops it afterwards; rerunning resumes from the
newest checkpoint. Exit status: 0 done, 1 training failed (cause on stderr), 2 bad job or
arguments, 143 stopped by SIGTERM and 130 by Ctrl-C, each after a final checkpoint (--no-ray)."""

from __future__ import annotations

import argparse
import sys

from bst_dist.commands.common import add_job_args, load_job
from bst_dist.errors import UserError


def add_args(p: argparse.ArgumentParser) -> None:
    add_job_args(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--address", default=None, metavar="ADDR",
                       help="Ray cluster (GCS) address, e.g. 10.0.0.2:6379 or auto (default: $RAY_ADDRESS, "
                            "then ray.address, else an embedded local Ray on 127.0.0.1)")
    where.add_argument("--no-ray", action="store_true",
                       help="run the training loop directly in this process (debugging)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="N CPU workers (each ray.cpu_devices_per_worker fake XLA devices), e.g. on a laptop")
    multi = p.add_argument_group("one process of a multi-process JAX job (with --no-ray; run once per process)")
    multi.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0")
    multi.add_argument("--num-processes", type=int, default=1, metavar="N", help="processes in the job")
    multi.add_argument("--process-id", type=int, default=0, metavar="I", help="this process's index")


def run(args: argparse.Namespace) -> int:
    from bst_dist import launch
    from bst_dist.launch.ray_trainer import TrainingFailed

    from bst_dist.commands.common import show_progress_logs

    show_progress_logs()
    cfg = load_job(args)
    if args.coordinator:
        if not args.no_ray:
            raise UserError("--coordinator joins a multi-process JAX job directly: use it with --no-ray")
        import jax

        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    try:
        summary = launch.train(cfg, address=args.address, workers=args.workers, no_ray=args.no_ray)
    except TrainingFailed as e:
        print(f"bst-dist train: {e}", file=sys.stderr)
        return 1
    if isinstance(summary, dict):
        losses = summary.get("losses") or []
        last = f", last loss {losses[-1]:.4f}" if losses else ""
        if summary.get("already_complete"):
            print(f"bst-dist train: {cfg.name} was already complete at step {summary.get('final_step')}: "
                  f"nothing to train; run dir {summary.get('run_dir')}")
        else:
            print(f"bst-dist train: {cfg.name} done at step {summary.get('final_step')}{last}; "
                  f"run dir {summary.get('run_dir')}")
    return 0

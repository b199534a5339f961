"""`python -m bst_dist.train JOB.yaml [--set k=v ...]`: the training loop in this process, without
Ray (debugging, and the subprocess runs of the resume tests). With --coordinator it joins a
multi-process JAX job first (one call per process), the way a Ray worker does. `bst-dist train`
is the command users run."""

import argparse
import logging
import sys

from bst_dist import config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bst_dist.train")
    p.add_argument("job")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-process runs)")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = config.load(args.job, args.overrides)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.coordinator:
        import jax

        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from bst_dist.train.checkpoint import IncompatibleCheckpoint
    from bst_dist.train.loop import train

    try:
        train(cfg)
    except (config.ConfigError, IncompatibleCheckpoint) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

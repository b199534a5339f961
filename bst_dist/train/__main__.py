"""`python -m bst_dist.train JOB.yaml [--set k=v ...]`: the training loop in this one process,
without Ray (debugging, and the subprocess runs of the resume tests). `bst-dist train` is the
command users run."""

import argparse
import logging
import sys

from bst_dist import config
from bst_dist.train.loop import train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bst_dist.train")
    p.add_argument("job")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = config.load(args.job, args.overrides)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

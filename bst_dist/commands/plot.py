"""`bst-dist plot RUN_DIR [--out DIR]`: PNG curves of a run's metrics (bst_dist.runs.plot.plot_run)."""

from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (holds metrics.jsonl, maybe eval.jsonl)")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write the PNGs (default: RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    from bst_dist.runs.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0

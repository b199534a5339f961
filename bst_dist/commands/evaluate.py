"""`bst-dist eval RUN_DIR|EXPORT [--job JOB.yaml] [--split validation] [--lengths 512,4096,16384]`: streamed perplexity
with the cache (per position bucket) and perplexity at each length T (the same text at every T, scored in
T-long rows from a fresh cache)."""

from __future__ import annotations

import json


def add_args(p):
    p.add_argument("run_dir", help="a run directory (holds job.yaml and checkpoints/), or an export (bst-dist export)")
    p.add_argument("--job", default=None, help="with an export: the job file whose data (and mesh) to evaluate on")
    p.add_argument("--split", default="validation")
    p.add_argument("--lengths", default="", help="comma-separated T for the at-length mode, e.g. 512,4096,16384")
    p.add_argument("--max-batches", type=int, default=0, help="streamed mode: stop after N steps (0: whole split)")
    p.add_argument("--max-docs", type=int, default=0, help="at-length mode: first N documents (0: all)")
    p.add_argument("--max-windows", type=int, default=0,
                   help="at-length mode: windows of max(--lengths) tokens per document (0: all); every T scores "
                        "the same windows")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def run(args) -> int:
    from bst_dist.errors import UserError
    from bst_dist.eval.run import evaluate_run
    from bst_dist.commands.common import show_progress_logs

    show_progress_logs()

    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--lengths {args.lengths!r}: expected comma-separated integers, e.g. 512,4096") from None
    result = evaluate_run(args.run_dir, split=args.split, lengths=lengths, max_batches=args.max_batches,
                          max_docs=args.max_docs, max_windows=args.max_windows, step=args.step, overrides=args.overrides, job=args.job)
    print(json.dumps(result, indent=2))
    return 0

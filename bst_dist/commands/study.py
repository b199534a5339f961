"""`bst-dist study STUDY.yaml [--only a,b] [--no-ray] [--out DIR] [--set K=V ...]`: train and
evaluate the runs of a study under one token budget, one JSON per run, then the report
(bst_dist.study). Rerunning resumes: finished runs are skipped, a half-trained run continues
from its checkpoint."""

from __future__ import annotations

import argparse
import logging


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study file (jobs/study/*.yaml)")
    p.add_argument("--only", default=None, metavar="A,B,...", help="run only these runs (names in the study file)")
    p.add_argument("--out", default=None, metavar="DIR", help="study directory (default: the study file's out:)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job key in every run, after the study's own (repeatable)")
    p.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="another token budget for every run (a short trial; default: the study file's tokens:)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--no-ray", action="store_true", help="train each run in this process")
    where.add_argument("--address", default=None, metavar="ADDR", help="Ray cluster (GCS) address")
    p.add_argument("--report-only", action="store_true", help="only rewrite report.md and plots/ from results/")


def run(args: argparse.Namespace) -> int:
    from bst_dist.study import runner, spec
    from bst_dist.study.report import write_report

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("bst_dist", "data_pipelines"):
        logging.getLogger(name).setLevel(logging.INFO)
    study = spec.load(args.study, out=args.out, overrides=args.overrides, tokens=args.tokens)
    if args.report_only:
        print(f"bst-dist study: {write_report(study)}")
        return 0
    results = runner.run_study(study, only=args.only, no_ray=args.no_ray, address=args.address)
    print(f"bst-dist study: {study.name}: {len(results)} run(s) done; report {study.out}/report.md")
    return 0

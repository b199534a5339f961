"""Kept for old scripts: `python -m ops.plan_memory JOB.yaml [--topology v5p-64]` is
`bst-dist plan` (bst_dist/parallel/plan.py holds the library)."""

from __future__ import annotations

import sys

from bst_dist.parallel.plan import plan  # noqa: F401 (the library function, for callers of this module)


def main(argv=None) -> int:
    from bst_dist.commands.main import main as cli

    return cli(["plan", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

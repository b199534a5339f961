"""Keep the `# params:` header of job files true: compute each job's parameter counts from shapes
(nnx.eval_shape, nothing allocated) and check or rewrite the header line.

    python -m ops.job_params jobs/*.yaml           # check (exit 1 on a mismatch)
    python -m ops.job_params --write jobs/*.yaml   # rewrite the lines

The header is on the jobs that set a model (jobs/*.yaml); a TPU variant includes its GPU job's.
"""

from __future__ import annotations

import argparse
import re
import sys

HEADER = re.compile(r"^# params: .*$", re.M)


def params_line(path: str) -> str:
    from bst_dist import config
    from bst_dist.runs.describe import count_params

    c = count_params(config.load(path).model)
    return (f"# params: total {c['total']:,} ({c['total'] / 1e6:.1f}M; {c['total_unpadded'] / 1e6:.1f}M at the "
            f"unpadded GPT-2 vocabulary), non-embedding {c['non_embedding']:,} ({c['non_embedding'] / 1e6:.1f}M)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.job_params")
    p.add_argument("jobs", nargs="+")
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    bad = 0
    for path in args.jobs:
        with open(path) as f:
            text = f.read()
        want = params_line(path)
        m = HEADER.search(text)
        if m and m.group(0) == want:
            continue
        if args.write:
            text = HEADER.sub(want, text, count=1) if m else text.replace("\n", f"\n{want}\n", 1)
            with open(path, "w") as f:
                f.write(text)
            print(f"{path}: {want[2:]}")
        else:
            bad += 1
            print(f"{path}: header says {m.group(0)[2:] if m else 'nothing'!r}; counted {want[2:]!r}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

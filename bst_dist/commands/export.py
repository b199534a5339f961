"""`bst-dist export RUN --out DIR [--dtype bfloat16]`: the parameters alone (no optimizer state),
with the model config and the tokenizer name, for generate, eval and train.init_from."""

from __future__ import annotations

import json


def add_args(p):
    p.add_argument("source", help="a run directory (newest checkpoint), a step directory, or an export")
    p.add_argument("--out", required=True, help="a new (or empty) directory")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")


def run(args) -> int:
    from bst_dist.commands.generate import _user_error
    from bst_dist.generate.params import ParamsError, export

    try:
        meta = export(args.source, args.out, dtype=args.dtype)
    except ParamsError as e:
        raise _user_error()(str(e)) from None
    print(json.dumps({k: meta[k] for k in ("tokenizer", "dtype", "source", "step")} | {"out": args.out}))
    return 0

"""`bst-dist generate RUN_DIR_OR_CHECKPOINT_OR_EXPORT --prompt TEXT | --prompt-file F`: sample from a
trained model with the block state carried, streaming text to stdout."""

from __future__ import annotations

import sys


def add_args(p):
    p.add_argument("source", help="a run directory (newest checkpoint), a step directory RUN/checkpoints/N, "
                                  "or an export (bst-dist export)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt text")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="> 0 (greedy: --top-k 1)")
    p.add_argument("--top-k", type=int, default=None, help=">= 1; 1 is greedy")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="independent samples of the prompt (row 0 is streamed)")


def _user_error():
    from bst_dist.errors import UserError  # the class the CLI turns into one line and exit status 2

    return UserError


def run(args) -> int:
    from bst_dist.generate.cli import generate_text

    UserError = _user_error()
    from bst_dist.generate.cli import EXPECTED

    try:
        generate_text(args.source, prompt=args.prompt, prompt_file=args.prompt_file, max_tokens=args.max_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      batch=args.batch, out=sys.stdout)
    except EXPECTED as e:
        raise UserError(str(e)) from None
    return 0

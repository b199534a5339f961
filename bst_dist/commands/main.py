"""`bst-dist`: a thin CLI. Each subcommand lives in bst_dist/commands/<name>.py and defines
`add_args(parser)` and `run(args) -> int`; each `run` parses, loads config and calls one library
function that the tests also call. Expected failures (bad job files, bad data, refused
checkpoints) are one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from bst_dist.errors import user_errors

# name -> (module under bst_dist.commands, one-line help)
COMMANDS = {
    "describe": ("describe", "show a job's layer stack and parameter counts"),
    "plan": ("plan", "will a job fit a TPU slice: per-chip memory, FLOPs and step time, compiled ahead of time"),
    "prepare-data": ("prepare_data", "tokenize a corpus into ArrayRecord shards"),
    "train": ("train", "train a job (under Ray Train; embedded local Ray by default)"),
    "eval": ("evaluate", "evaluate a run: streamed with the cache, and at length T"),
    "plot": ("plot", "write PNG curves of a run's metrics"),
    "inspect": ("inspect", "show a run's checkpoints: step, data position, shardings"),
    "submit": ("submit", "submit a job to a Ray cluster and stream its logs"),
    "status": ("job_status", "status of a submitted Ray job"),
    "stop": ("job_stop", "stop a submitted Ray job"),
    "generate": ("generate", "sample text from a run or an export, streaming to stdout"),
    "export": ("export", "write a run's parameters alone (no optimizer) with the model config"),
    "study": ("study", "train and evaluate a study's runs under one token budget, then report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bst-dist", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        mod = importlib.import_module(f"bst_dist.commands.{module}")
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        mod.add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Short form for `ray job submit -- jobs/x.yaml` and executable YAMLs: a bare YAML path trains it.
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = ["train", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    module = importlib.import_module(f"bst_dist.commands.{args._module}")
    try:
        return int(module.run(args) or 0)
    except user_errors() as e:
        print(f"bst-dist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bst-dist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

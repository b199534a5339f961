"""`bst-dist plan JOB.yaml [--topology v5p-64] [--slices 2]`: per-chip memory, FLOPs and step time
of the real train step compiled ahead of time (docs/scaling.md)."""

from __future__ import annotations

import json

from bst_dist.commands.common import add_job_args, load_job


def add_args(p):
    add_job_args(p)
    p.add_argument("--topology", default=None, metavar="NAME",
                   help="a TPU slice, e.g. v5p-64 or 2x4x4 (needs the tpu extra); default: the devices present")
    p.add_argument("--slices", type=int, default=1, help="TPU slices joined by DCN (set mesh.dcn.data to match)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the step-time estimate")
    p.add_argument("--no-compile", action="store_true", help="only the checks and the analytic bound")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="also write the plan as JSON to PATH, with the command line and the jax/libtpu versions")


def run(args) -> int:
    from bst_dist.errors import UserError
    from bst_dist.parallel.plan import format_plan, plan
    from bst_dist.commands.common import show_progress_logs

    show_progress_logs()

    if args.slices < 1:
        raise UserError(f"--slices: must be >= 1, got {args.slices}")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu: must be in (0, 1], got {args.mfu}")
    cfg = load_job(args)
    devices = None
    if args.topology:
        from bst_dist.parallel.topology import topology_devices

        devices = topology_devices(args.topology, args.slices)
    elif args.slices != 1:
        raise UserError("--slices: needs --topology (the slices of which TPU)")
    p = plan(cfg, devices, mfu=args.mfu, compile_step=not args.no_compile)
    print(json.dumps(p, indent=1) if args.json else format_plan(p))
    if args.out:
        write_plan(args.out, p, command_line(args))
    return 0


def command_line(args) -> list[str]:
    """The arguments that reproduce this plan (the --out path left out)."""
    argv = [args.job, *(a for o in args.overrides for a in ("--set", o))]
    if args.topology:
        argv += ["--topology", args.topology]
    if args.slices != 1:
        argv += ["--slices", str(args.slices)]
    if args.mfu != 0.4:
        argv += ["--mfu", str(args.mfu)]
    return argv + (["--no-compile"] if args.no_compile else [])


def write_plan(path: str, p: dict, argv: list[str]) -> None:
    """The plan as a committed record: what was run, with which jax and libtpu, and the figures."""
    import os
    import shlex

    from bst_dist.parallel.plan import versions

    record = {"command": shlex.join(["bst-dist", "plan", *argv]), "versions": versions(), **p}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")

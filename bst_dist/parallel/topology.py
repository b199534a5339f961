"""TPU slice facts the job spec is checked against before anything is submitted: chips per host
and hosts per slice for a topology name ("2x4x4", "v5p-64"), and the Ray worker count they imply
(one JAX process per TPU host, `mesh.dcn` slices)."""

from __future__ import annotations

import math

CHIPS_PER_HOST = {"TPU-V4": 4, "TPU-V5P": 4, "TPU-V5LITEPOD": 4, "TPU-V6E": 4}
# v5p-N names count TensorCores (2 per chip); the topology is the chip grid.
NAMED = {"v5p-8": "2x2x1", "v5p-16": "2x2x2", "v5p-32": "2x2x4", "v5p-64": "2x4x4", "v5p-128": "4x4x4",
         "v5p-256": "4x4x8", "v5p-512": "4x8x8", "v4-8": "2x2x1", "v4-16": "2x2x2", "v4-32": "2x2x4",
         "v4-64": "2x4x4", "v4-128": "4x4x4"}


def chips(topology: str) -> int:
    """Chips of a topology like '2x4x4' (raises ValueError on anything else)."""
    dims = [int(x) for x in topology.lower().split("x")]
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(topology)
    return math.prod(dims)


def hosts_per_slice(topology: str, accelerator_type: str | None = None) -> int:
    per_host = CHIPS_PER_HOST.get((accelerator_type or "TPU-V5P").upper(), 4)
    n = chips(topology)
    return max(1, n // per_host)


def check_num_workers(num_workers: int, topology: str, accelerator_type: str | None, slices: int) -> str | None:
    """None when `num_workers` is one per host of every slice; else the one-line complaint."""
    try:
        hosts = hosts_per_slice(topology, accelerator_type)
    except ValueError:
        named = NAMED.get(topology.lower())
        return f"ray.topology: {topology!r} is not a chip grid like 2x4x4" + (f"; {topology} is {named}" if named else "")
    if num_workers % hosts:
        return (f"ray.num_workers: {num_workers} must be a multiple of {hosts} (hosts per slice) for topology "
                f"{topology}")
    if num_workers != hosts * slices:
        return (f"ray.num_workers: {num_workers} must be {hosts} hosts per slice x {slices} slice(s) "
                f"(mesh.dcn) = {hosts * slices} for topology {topology}")
    return None


def libtpu_present() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: str, slices: int = 1) -> list:
    """The devices of a TPU slice (or `slices` of them) described by libtpu, without any TPU: for
    lane maps and ahead-of-time compilation on a CPU host. `topology`: "v5p-64" or "2x4x4" (v5p)."""
    from bst_dist.errors import UserError

    grid = NAMED.get(topology.lower(), topology)
    try:
        chips(grid)
    except ValueError:
        raise UserError(f"--topology: {topology!r} is not a TPU name ({', '.join(NAMED)}) or a chip grid like 2x4x4")
    if not libtpu_present():
        raise UserError('libtpu is not installed: pip install "jax[tpu]==0.10.2" (the tpu extra) to describe TPU '
                        "topologies on this host")
    import os

    # No TPU is opened: describing a topology needs no exclusive libtpu lock, so several planners
    # (and a test run) may share the host; the hostnames only quiet libtpu's start-up probe.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=f"v5:{grid}", chip_config_name="megacore",
                                            chips_per_host_bounds=(2, 2, 1), num_slices=slices)
    except Exception as e:  # libtpu reports a held lock or a bad grid as a RuntimeError
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if "lock" in text.lower():
            raise UserError(f"libtpu is locked by another process ({text}); wait for it, or remove "
                            "/tmp/libtpu_lockfile if no process holds it") from None
        raise UserError(f"--topology {topology}: libtpu cannot describe it: {text}") from None
    return list(desc.devices)

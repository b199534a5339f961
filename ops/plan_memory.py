"""Will this job fit? Compile the real train step ahead of time for a mesh and report per-device
memory (arguments, outputs, temporaries) and FLOPs, without allocating anything.

    python -m ops.plan_memory jobs/pg19_400m.yaml                      # the devices present
    python -m ops.plan_memory jobs/pg19_400m.yaml --tpu v5:4x4x4        # a TPU pod slice, from a CPU
                                                                       # machine (needs jax[tpu]:
                                                                       # pip install "jax[tpu]==<jax version>")

With --tpu the devices come from `jax.experimental.topologies.get_topology_desc`, so XLA
compiles for the pod's HBM: an over-large batch fails here, at planning time, with
RESOURCE_EXHAUSTED naming the shortfall, instead of minutes into a pod allocation.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp


def abstract_inputs(cfg, mesh):
    """ShapeDtypeStructs (with shardings) for state, cache and batch: nothing is allocated."""
    from bst_dist.train.state import plan as plan_state
    from bst_dist.train.step import batch_shardings

    setup, state, _ = plan_state(cfg, mesh)
    B, L = cfg.train.global_batch_size, cfg.model.seq_len
    bsh = batch_shardings(setup)
    batch = {"inputs": jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=bsh["inputs"]),
             "targets": jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=bsh["targets"]),
             "loss_mask": jax.ShapeDtypeStruct((B, L), jnp.float32, sharding=bsh["loss_mask"]),
             "doc_start": jax.ShapeDtypeStruct((B,), jnp.bool_, sharding=bsh["doc_start"])}
    return setup, state, setup.abstract_cache(), batch


def plan(cfg, devices=None) -> dict:
    from bst_dist import parallel
    from bst_dist.train.step import make_train_step

    mesh = parallel.make_mesh(cfg.mesh, devices)
    setup, state, cache, batch = abstract_inputs(cfg, mesh)
    compiled = make_train_step(setup).lower(state, cache, batch).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gib = 2.0 ** 30
    out = {"devices": len(mesh.devices.flat), "platform": mesh.devices.flat[0].platform, "mesh": dict(mesh.shape)}
    if mem is not None:
        out.update({"argument_gib": mem.argument_size_in_bytes / gib, "output_gib": mem.output_size_in_bytes / gib,
                    "temp_gib": mem.temp_size_in_bytes / gib,
                    "peak_gib_estimate": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / gib})
    if cost:
        out["flops_per_device"] = float(cost.get("flops", 0.0))
    return out


def tpu_devices(topology: str, slices: int = 1):
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="megacore",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=slices).devices


def main(argv=None) -> int:
    from bst_dist import config

    p = argparse.ArgumentParser(prog="python -m ops.plan_memory", description=__doc__.split("\n")[0])
    p.add_argument("job")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--tpu", default=None, help="a TPU topology, e.g. v5:4x4x4 (needs jax[tpu])")
    p.add_argument("--slices", type=int, default=1)
    args = p.parse_args(argv)
    try:
        cfg = config.load(args.job, args.overrides)
        devices = tpu_devices(args.tpu, args.slices) if args.tpu else None
        print(json.dumps(plan(cfg, devices), indent=1))
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

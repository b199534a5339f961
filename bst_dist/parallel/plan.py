"""Will this job fit, and how fast? The real sharded train step compiled ahead of time for a
topology (a TPU slice described by libtpu, on a CPU host) or for the devices present, with
nothing allocated: per-chip memory (arguments, outputs, temporaries, peak vs HBM), FLOPs per
step and a step time at a stated MFU.

Before compiling, a job that cannot run is refused in one line: a batch or heads the mesh
cannot split (parallel.check_fits), or an analytic lower bound (the sharded train state, cache
and batch, which must all be resident) over the chip's HBM, with the shortfall and a mesh that
fits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import jax
import jax.numpy as jnp

from bst_dist.errors import UserError

log = logging.getLogger("bst_dist.plan")

GIB = 2.0 ** 30
# per chip: HBM bytes and peak dense bf16 FLOP/s (a v5p/v4 megacore device is one chip)
CHIPS = {"TPU v5": (95 * GIB, 459e12), "TPU v5p": (95 * GIB, 459e12), "TPU v4": (32 * GIB, 275e12),
         "TPU v5 lite": (16 * GIB, 197e12), "TPU v6 lite": (32 * GIB, 918e12)}


class DoesNotFit(UserError):
    """The job's resident state alone exceeds the chip's memory."""


def abstract_inputs(cfg, mesh):
    """(setup, state, cache, batch) as ShapeDtypeStructs with shardings: nothing is allocated."""
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


def per_chip_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def resident_bytes(cfg, mesh) -> dict:
    """The analytic lower bound: what must sit in one chip's memory for the whole step."""
    _, state, cache, batch = abstract_inputs(cfg, mesh)
    out = {"params": per_chip_bytes(state["params"]), "optimizer": per_chip_bytes(state["opt_state"]),
           "cache": per_chip_bytes(cache), "batch": per_chip_bytes(batch)}
    out["total"] = sum(out.values())
    return out


def versions() -> dict:
    """jax, jaxlib and libtpu as installed: a compiled plan's figures belong to these."""
    import importlib.metadata as md

    out = {}
    for name in ("jax", "jaxlib", "libtpu"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def chip_facts(devices) -> tuple[float | None, float | None, str]:
    kind = getattr(devices[0], "device_kind", "?")
    hbm, peak = CHIPS.get(kind, (None, None))
    if hbm is None:
        stats = getattr(devices[0], "memory_stats", lambda: None)
        try:
            hbm = (stats() or {}).get("bytes_limit")
        except Exception:  # noqa: BLE001 - CPU devices have no stats
            hbm = None
    return hbm, peak, kind


def suggest_mesh(cfg, devices, hbm: float) -> str | None:
    """The first (fsdp, tensor) split, smallest first, whose resident state fits `hbm`."""
    from bst_dist import parallel

    n = len(devices)
    for fsdp in (f for f in (1, 2, 4, 8, 16, 32, 64, 128) if n % f == 0):
        for tensor in (t for t in (1, 2, 4, 8) if (n // fsdp) % t == 0 and cfg.model.num_heads % t == 0):
            mesh_cfg = dataclasses.replace(cfg.mesh, data=n // fsdp // tensor, fsdp=fsdp, tensor=tensor)
            trial = dataclasses.replace(cfg, mesh=mesh_cfg)
            try:
                parallel.check_fits(trial, {"data": n // fsdp // tensor, "fsdp": fsdp, "tensor": tensor})
                mesh = parallel.make_mesh(mesh_cfg, devices)
            except UserError:
                continue
            if resident_bytes(trial, mesh)["total"] < hbm:
                return f"mesh.data={n // fsdp // tensor} mesh.fsdp={fsdp} mesh.tensor={tensor}"
    return None


def plan(cfg, devices=None, *, mfu: float = 0.4, compile_step: bool = True) -> dict:
    """The plan of `cfg` on `devices` (default: the devices present); see the module docstring."""
    from bst_dist import parallel
    from bst_dist.models.flops import train_step_flops
    from bst_dist.train.step import make_train_step

    devices = list(jax.devices() if devices is None else devices)
    sizes = dict(zip(parallel.AXES, parallel.mesh_shape(cfg.mesh, len(devices))))
    hosts = len({d.process_index for d in devices})
    parallel.check_fits(cfg, sizes, hosts)
    mesh = parallel.make_mesh(cfg.mesh, devices)
    hbm, peak, kind = chip_facts(devices)
    floor = resident_bytes(cfg, mesh)
    out = {"devices": len(devices), "hosts": hosts, "device_kind": kind, "platform": devices[0].platform,
           "mesh": dict(mesh.shape), "hbm_gib": hbm / GIB if hbm else None,
           "resident_gib": {k: v / GIB for k, v in floor.items()}}
    if hbm and floor["total"] > hbm:
        fit = suggest_mesh(cfg, devices, hbm)
        raise DoesNotFit(f"mesh {sizes}: the train state, cache and batch alone need {floor['total'] / GIB:.1f} GiB "
                         f"per chip, HBM is {hbm / GIB:.1f} GiB (short by {(floor['total'] - hbm) / GIB:.1f} GiB); "
                         + (f"try --set {fit.replace(' ', ' --set ')}" if fit else "no fsdp x tensor split fits"))
    flops = train_step_flops(cfg.model, cfg.train.global_batch_size)
    out["model_flops_per_step"] = flops
    if peak:
        out["mfu"] = mfu
        out["step_time_s_estimate"] = flops / (len(devices) * peak * mfu)
        out["tokens_per_s_estimate"] = cfg.train.global_batch_size * cfg.model.seq_len / out["step_time_s_estimate"]
    if not compile_step:
        return out
    setup, state, cache, batch = abstract_inputs(cfg, mesh)
    # a 400M step for 64 chips takes 10-15 CPU-minutes and ~9-11 GB here (docs/scaling.md): say so
    log.info("compiling the train step for %d devices on this host (a pod-sized plan: minutes)", len(devices))
    t0 = time.perf_counter()
    try:
        compiled = make_train_step(setup).lower(state, cache, batch).compile()
    except jax.errors.JaxRuntimeError as e:  # XLA's own verdict: the activations do not fit
        text = (str(e).strip().splitlines() or ["compile failed"])[0][:300]
        if "RESOURCE_EXHAUSTED" in text:
            raise DoesNotFit(f"mesh {sizes}: the compiled step does not fit: {text}; try a larger mesh.fsdp, "
                             "train.grad_accum or train.remat") from None
        raise
    log.info("compiled in %.0f s", time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if mem is not None:
        peak_bytes = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + \
            mem.temp_size_in_bytes
        out.update({"argument_gib": mem.argument_size_in_bytes / GIB, "output_gib": mem.output_size_in_bytes / GIB,
                    "alias_gib": mem.alias_size_in_bytes / GIB, "temp_gib": mem.temp_size_in_bytes / GIB,
                    "peak_gib_estimate": peak_bytes / GIB})
        if hbm:
            out["fits"] = peak_bytes <= hbm
    if cost:
        out["flops_per_device"] = float(cost.get("flops", 0.0))
    return out


def format_plan(p: dict) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [f"{p['devices']} {p['device_kind']} devices on {p['hosts']} host(s), mesh {mesh}"]
    r = p["resident_gib"]
    lines.append(f"  resident per chip: {r['total']:.2f} GiB (params {r['params']:.2f}, optimizer "
                 f"{r['optimizer']:.2f}, cache {r['cache']:.2f}, batch {r['batch']:.3f})")
    if "argument_gib" in p:
        hbm = f" of {p['hbm_gib']:.1f} GiB HBM" if p.get("hbm_gib") else ""
        verdict = "" if "fits" not in p else ("  fits" if p["fits"] else "  DOES NOT FIT")
        lines.append(f"  compiled per chip: arguments {p['argument_gib']:.2f} GiB, outputs {p['output_gib']:.2f} "
                     f"(aliased {p['alias_gib']:.2f}), temporaries {p['temp_gib']:.2f}; peak "
                     f"{p['peak_gib_estimate']:.2f} GiB{hbm}{verdict}")
    lines.append(f"  model FLOPs per step: {p['model_flops_per_step']:.3e}"
                 + (f" (compiled, per device: {p['flops_per_device']:.3e})" if p.get("flops_per_device") else ""))
    if "step_time_s_estimate" in p:
        lines.append(f"  step time at {p['mfu']:.0%} MFU: {p['step_time_s_estimate'] * 1e3:.2f} ms "
                     f"({p['tokens_per_s_estimate']:.0f} tokens/s)")
    return "\n".join(lines)

"""`bst-dist inspect RUN_DIR`: what a run holds, read from its files without building a model or
touching a device: the checkpoints on disk (complete and half-written), the newest one's step,
tokens seen and code version, its data position per lane, the saved arrays with their shapes
and shardings (so an operator can see how a run was laid out before resuming it elsewhere), and
the last logged metrics."""

from __future__ import annotations

import glob
import json
import logging
import os
import re

import yaml


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _arrays(item_dir: str) -> list[dict]:
    """(path, global shape, partition spec, mesh shape) of every array of an Orbax StandardSave
    item, from its metadata alone (no array is read)."""
    item_dir = os.path.abspath(item_dir)  # Orbax reads absolute paths only (a relative one read as empty)
    if not os.path.exists(os.path.join(item_dir, "_METADATA")):
        return []
    import jax
    import orbax.checkpoint as ocp

    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # Orbax warns that an item dir has no step-level metadata file
    try:
        meta = ocp.StandardCheckpointer().metadata(item_dir)
    finally:
        absl_log.setLevel(level)
    tree = getattr(meta, "item_metadata", meta)
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not hasattr(leaf, "shape"):
            continue
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        sh = getattr(leaf, "sharding", None)
        spec = getattr(sh, "partition_spec", None)
        mesh = dict(zip(getattr(sh, "axis_names", []) or [], [int(x) for x in getattr(sh, "shape", [])]))
        out.append({"path": "/".join(k for k in keys if k != "value"), "shape": list(leaf.shape),
                    "spec": [list(p) if isinstance(p, tuple) else p for p in spec] if spec is not None else None,
                    "mesh": mesh})
    return out


def _lanes(data_dir: str) -> dict | None:
    files = sorted(glob.glob(os.path.join(data_dir, "process_*-of-*.json")))
    if not files:
        return None
    state = _read_json(files[0])
    lanes = state.get("lanes", [])
    epochs = [lane[0] for lane in lanes]
    return {"written_by_processes": len(files), "step": state.get("step"), "split": state.get("split"),
            "seq_len": state.get("seq_len"), "lanes": len(lanes),
            "epochs": [min(epochs), max(epochs)] if epochs else None,
            "per_lane": [{"epoch": lane[0], "document_in_epoch": lane[1], "sequence": lane[2]} for lane in lanes]}


def inspect_run(run_dir: str) -> dict:
    from bst_dist.errors import UserError

    job_path = os.path.join(run_dir, "job.yaml")
    if not os.path.isfile(job_path):
        raise UserError(f"{run_dir}: not a run directory (no job.yaml)")
    with open(job_path) as f:
        job = yaml.safe_load(f)
    ckpt_dir = job.get("checkpoint", {}).get("dir") or os.path.join(run_dir, "checkpoints")
    complete, partial = [], []
    for name in sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []:
        if re.fullmatch(r"\d+", name) and os.path.exists(os.path.join(ckpt_dir, name, "_CHECKPOINT_METADATA")):
            complete.append(int(name))
        elif "tmp" in name:
            partial.append(name)
    complete.sort()
    out = {"run_dir": run_dir, "name": job.get("name"), "checkpoint_dir": ckpt_dir, "steps": complete,
           "half_written": partial}
    if complete:
        from bst_dist.train.checkpoint import format_version  # jax and Orbax only when there is a step
        from bst_dist.train.integrity import MANIFEST

        step_dir = os.path.join(ckpt_dir, str(complete[-1]))
        meta_file = os.path.join(step_dir, "meta", "metadata")
        meta = _read_json(meta_file) if os.path.exists(meta_file) else {}
        state = _arrays(os.path.join(step_dir, "state"))
        params = [a for a in state if a["path"].startswith("params/")]
        out["newest"] = {
            "step": meta.get("step", complete[-1]), "tokens_seen": meta.get("tokens_seen"),
            "code_version": meta.get("code_version"), "format_version": format_version(meta),
            "verified": os.path.exists(os.path.join(step_dir, MANIFEST)),
            "parameters": sum(_prod(a["shape"]) for a in params),
            "mesh": params[0]["mesh"] if params else None,
            "params": params, "cache": _arrays(os.path.join(step_dir, "cache")),
            "data": _lanes(os.path.join(step_dir, "data")),
        }
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        last = None
        with open(metrics) as f:
            for line in f:
                try:
                    last = json.loads(line)
                except json.JSONDecodeError:
                    pass
        out["last_metrics"] = last
    return out


def _prod(shape) -> int:
    n = 1
    for s in shape or []:
        n *= s
    return n


def format_inspection(d: dict) -> str:
    lines = [f"run {d['run_dir']} ({d['name']})", f"  checkpoints in {d['checkpoint_dir']}: steps {d['steps'] or 'none'}"]
    if d["half_written"]:
        lines.append(f"  half-written (never restored): {', '.join(d['half_written'])}")
    n = d.get("newest")
    if n:
        lines.append(f"  newest: step {n['step']}, tokens seen {n['tokens_seen']:,}, code {n['code_version']}, "
                     f"format {n['format_version']}{'' if n['verified'] else ' (no integrity manifest)'}, "
                     f"{n['parameters']:,} parameters on mesh {n['mesh']}")
        data = n.get("data")
        if data:
            lines.append(f"  data: {data['lanes']} lanes of the {data['split']} split at step {data['step']} "
                         f"(epochs {data['epochs'][0]}..{data['epochs'][1]}), written by {data['written_by_processes']} process(es)")
        lines.append("  params (shape, sharding):")
        for a in n["params"]:
            lines.append(f"    {a['path']:<48} {str(a['shape']):<16} {a['spec']}")
        if n["cache"]:
            lines.append("  cache:")
            for a in n["cache"]:
                lines.append(f"    {a['path']:<48} {str(a['shape']):<16} {a['spec']}")
    if d.get("last_metrics"):
        m = d["last_metrics"]
        lines.append(f"  last logged step {m.get('step')}: loss {m.get('loss')}")
    return "\n".join(lines)

"""Parameters without the optimizer: read from a run directory's checkpoint (newest step, or a
step directory `RUN/checkpoints/N`) or from an export (`bst-dist export`), written as an export,
and loaded as the initial parameters of a new run (`train.init_from`).

An export directory holds `export.json` (format version, the model config, the tokenizer name,
the parameter dtype, the source run and step) and `params/` (an Orbax PyTree of the parameters
alone). A checkpoint's `state` item holds params, optimizer state and step; only its `params`
subtree is read (Orbax partial restore), so the optimizer state is never allocated.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from bst_dist import config as config_lib
from bst_dist.errors import UserError

EXPORT_FORMAT = "bst_dist-params"
EXPORT_VERSION = 1


class ParamsError(UserError, ValueError):
    """A path that holds no parameters, or parameters of another model (a one-line message)."""


# -- locating ----------------------------------------------------------------------------------


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "export.json"))


def _steps(ckpt_dir: str) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n)))


def locate_checkpoint(path: str) -> tuple[str, str, int]:
    """(run dir, step directory, step) for a run directory (its newest step) or a step directory."""
    path = os.path.abspath(path)
    name = os.path.basename(path)
    if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
        run_dir = os.path.dirname(os.path.dirname(path))
        return run_dir, path, int(name)
    if not os.path.isfile(os.path.join(path, "job.yaml")):
        raise ParamsError(f"{path}: neither a run directory (job.yaml), a checkpoint step directory "
                          f"(RUN/checkpoints/N) nor an export (export.json)")
    with open(os.path.join(path, "job.yaml")) as f:
        raw = yaml.safe_load(f) or {}
    ckpt_dir = (raw.get("checkpoint") or {}).get("dir") or os.path.join(path, "checkpoints")
    steps = _steps(ckpt_dir)
    if not steps:
        raise ParamsError(f"{path}: the run has no checkpoint in {ckpt_dir}")
    return path, os.path.join(ckpt_dir, str(steps[-1])), steps[-1]


def _read_meta(step_dir: str) -> dict:
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(step_dir, "meta"))
    return dict(meta)


# -- abstract trees ----------------------------------------------------------------------------


def abstract_params(model_cfg: config_lib.ModelConfig):
    """(graphdef, abstract nnx.State of the parameters) of a model, nothing allocated."""
    from bst_dist.models import build

    return nnx.split(nnx.eval_shape(lambda: build(model_cfg, nnx.Rngs(0))))


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _on_device(tree, dtype=None):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=sharding), tree)


def _restore_pytree(directory: str, item):
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                    partial_restore=True))


def check_shapes(got, want, source: str) -> None:
    """One line naming the first parameter whose presence or shape differs."""
    g = {_path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(got)[0]}
    w = {_path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
    for key in w:
        if key not in g:
            raise ParamsError(f"{source}: has no parameter {key} (the model needs shape {tuple(w[key])})")
        if tuple(g[key]) != tuple(w[key]):
            raise ParamsError(f"{source}: parameter {key} has shape {tuple(g[key])}, the model needs {tuple(w[key])}")
    for key in g:
        if key not in w:
            raise ParamsError(f"{source}: parameter {key} is not in the model")


def _tokenizer_name() -> str:
    from data_pipelines import tokenizer

    return tokenizer.NAME


# -- reading -----------------------------------------------------------------------------------


def read_source(path: str) -> tuple[config_lib.ModelConfig, dict, dict]:
    """(model config, pure-dict float32 parameters on one device, info) from a run, a step or an export."""
    if is_export(path):
        with open(os.path.join(path, "export.json")) as f:
            info = json.load(f)
        if info.get("format") != EXPORT_FORMAT or info.get("version", 0) > EXPORT_VERSION:
            raise ParamsError(f"{path}: export.json is not a bst_dist parameter export this version reads")
        model_cfg = config_lib.from_dict({"model": info["model"]}).model
        _, abstract = abstract_params(model_cfg)
        item = _on_device(nnx.to_pure_dict(abstract), jnp.dtype(info.get("dtype", "float32")))
        params = _restore_pytree(os.path.join(path, "params"), item)
        return model_cfg, params, {**info, "path": path}
    run_dir, step_dir, step = locate_checkpoint(path)
    meta = _read_meta(step_dir)
    saved = meta.get("config") or {}
    if "model" not in saved:
        raise ParamsError(f"{step_dir}: the checkpoint's meta holds no model config")
    job_yaml = os.path.join(run_dir, "job.yaml")
    if os.path.isfile(job_yaml):  # a checkpoint copied into another model's run is refused
        from bst_dist.train.checkpoint import check_compatible

        with open(job_yaml) as f:
            job = config_lib.to_dict(config_lib.from_dict(yaml.safe_load(f) or {}))
        job["train"] = dict(saved.get("train") or {})  # the batch size does not matter for sampling
        check_compatible(meta, job, source=step_dir)
    model_cfg = config_lib.from_dict({"model": saved["model"]}).model
    _, abstract = abstract_params(model_cfg)
    item = {"params": _on_device(abstract)}  # the nnx.State as training saved it
    try:
        params = nnx.to_pure_dict(_restore_pytree(os.path.join(step_dir, "state"), item)["params"])
    except (ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ParamsError(f"{step_dir}: the parameters do not match the model in its meta ({first})") from None
    return model_cfg, params, {"run_dir": run_dir, "step": step, "path": step_dir,
                               "tokenizer": _tokenizer_name()}


def load_model(path: str, expect: config_lib.ModelConfig | None = None):
    """(model, info) with float32 parameters; `expect`: refuse parameters of another model."""
    model_cfg, params, info = read_source(path)
    graphdef, abstract = abstract_params(model_cfg)
    if expect is not None:
        _, want = abstract_params(expect)
        check_shapes(params, nnx.to_pure_dict(want), path)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = abstract
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), {**info, "model_cfg": model_cfg}


def load_init_params(path: str, model_cfg: config_lib.ModelConfig, abstract_params):
    """The parameters of a run or an export as the initial parameters of a model `model_cfg`
    whose abstract parameters (an nnx.State or pure dict of ShapeDtypeStructs, shardings
    honoured) are given: same tree, shapes and dtypes as `abstract_params`. A missing parameter
    or a shape mismatch is one ParamsError line naming the parameter path and both shapes."""
    _, params, _ = read_source(path)
    want = nnx.to_pure_dict(abstract_params) if isinstance(abstract_params, nnx.State) else abstract_params
    check_shapes(params, want, path)
    g = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def put(p, a):
        x = np.asarray(g[_path_str(p)], dtype=a.dtype)
        s = getattr(a, "sharding", None)
        return jax.device_put(x, s) if s is not None else jnp.asarray(x)

    out = jax.tree_util.tree_map_with_path(put, want)
    if isinstance(abstract_params, nnx.State):
        state = jax.tree.map(lambda x: x, abstract_params)
        nnx.replace_by_pure_dict(state, out)
        return state
    return out


# -- writing -----------------------------------------------------------------------------------


def export(source: str, out: str, dtype: str = "float32") -> dict:
    """Write the parameters of `source` (run, step or export) to `out` as an export; returns its info."""
    if dtype not in ("float32", "bfloat16"):
        raise ParamsError(f"--dtype {dtype!r}: allowed float32, bfloat16")
    if os.path.exists(out) and os.listdir(out):
        raise ParamsError(f"{out}: exists and is not empty; pass a new directory")
    model_cfg, params, info = read_source(source)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(dtype)), params)
    os.makedirs(out, exist_ok=True)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(os.path.join(os.path.abspath(out), "params"), args=ocp.args.PyTreeSave(params))
    meta = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": config_lib.to_dict(model_cfg),
            "tokenizer": info.get("tokenizer") or _tokenizer_name(), "dtype": dtype,
            "source": info.get("run_dir") or info.get("source"), "step": info.get("step")}
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta

"""Runs of the tiny job (helpers/tiny.py) for the training-level tests: as a subprocess or in this
process, reading checkpoints and metrics back, counting compilations, unwritable and full
locations."""

import json
import os
import shutil
import subprocess
import sys

from tests.helpers.paths import REPO


def train_subprocess(job: str, run_dir: str, *extra: str, devices: int = 8) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "bst_dist", "train", "--no-ray", job, "--set", f"train.run_dir={run_dir}", *extra]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metrics_lines(run_dir: str) -> list[str]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f.read().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# In-process jobs (the caller's process already has the 8 fake devices of conftest.py)


def make_cfg(job: dict, run_dir, overrides: list[str] | None = None):
    """The validated JobConfig of `job` with train.run_dir set (and `--set`-style overrides)."""
    from bst_dist import config

    return config.from_dict(job, [f"train.run_dir={run_dir}", *(overrides or [])])


def train_in_process(job: dict, run_dir, overrides: list[str] | None = None) -> dict:
    """bst_dist.train.loop.train on the job; returns its summary."""
    from bst_dist.train.loop import train

    return train(make_cfg(job, run_dir, overrides))


def copy_checkpoint(src_run_dir, dst_run_dir, step: int) -> None:
    """A new run dir holding only checkpoint `step` of another run (as if that run stopped there)."""
    src = os.path.join(src_run_dir, "checkpoints", str(step))
    assert os.path.isdir(src), f"no checkpoint step {step} in {src_run_dir}: {os.listdir(os.path.dirname(src))}"
    shutil.copytree(src, os.path.join(dst_run_dir, "checkpoints", str(step)))


def checkpoint_steps(run_dir) -> list[int]:
    d = os.path.join(run_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def losses_of(run_dir) -> list[float]:
    """The per-step losses of metrics.jsonl, in step order."""
    return [json.loads(line)["loss"] for line in metrics_lines(run_dir)]


class CompileCounter:
    """Counts XLA backend compilations while active (jax.monitoring), to assert that a bad job
    is refused before anything is compiled."""

    def __init__(self):
        self.count = 0

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        import jax
        import numpy as np

        jax.monitoring.register_event_duration_secs_listener(self._listener)
        # The instrument proves itself each time: a fresh function must register a compilation,
        # else every "nothing was compiled" assertion would pass vacuously.
        salt = float(np.random.default_rng().integers(1 << 30))
        jax.jit(lambda x: x * salt + 1)(np.arange(3.0))
        assert self.count >= 1, "CompileCounter saw no compilation of a fresh function: the listener is dead"
        self.count = 0
        return self

    def __exit__(self, *exc):
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listener)


# --------------------------------------------------------------------------------------------
# Reading checkpoints back


def read_checkpoint(run_dir, step: int) -> dict:
    """Checkpoint `step` of a run as written, without building the model: {"state", "cache" (None
    when not written), "meta", "data" (the loader state)}. Arrays come back with the shardings they
    were saved with (on this process's devices); nnx Variables as {"value": array} dicts."""
    import orbax.checkpoint as ocp

    d = os.path.join(str(run_dir), "checkpoints", str(step))
    with ocp.StandardCheckpointer() as ckpt:
        out = {"state": ckpt.restore(os.path.join(d, "state")),
               "cache": ckpt.restore(os.path.join(d, "cache")) if os.path.isdir(os.path.join(d, "cache")) else None}
    with open(os.path.join(d, "meta", "metadata")) as f:
        out["meta"] = json.load(f)
    with open(os.path.join(d, "data", "process_0-of-1.json")) as f:
        out["data"] = json.load(f)
    return out


def digest(tree) -> str:
    """sha256 of a pytree's array bytes, for bitwise comparisons."""
    from bst_dist.train.loop import tree_digest

    return tree_digest(tree)


def model_params(cfg, saved_params):
    """(graphdef, nnx.State) of cfg's model holding the parameters of a `read_checkpoint` state."""
    import jax
    from flax import nnx

    from bst_dist.models import build

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(cfg.model, nnx.Rngs(0))))
    leaves = jax.tree.leaves(saved_params)
    want = jax.tree.leaves(abstract)
    assert [x.shape for x in leaves] == [x.shape for x in want], "checkpoint and model differ"
    return graphdef, jax.tree.unflatten(jax.tree.structure(abstract), leaves)


# --------------------------------------------------------------------------------------------
# Unwritable and full locations


def tmpfs(path, size: str, *, read_only: bool = False):
    """Mount a tmpfs of `size` on `path` (a context manager); pytest.skip where mounting is not
    allowed (not root, or no mount privilege in this container)."""
    import contextlib

    import pytest

    @contextlib.contextmanager
    def mounted():
        os.makedirs(path, exist_ok=True)
        opts = f"size={size}" + (",ro" if read_only else "")
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if p.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode})")
        try:
            yield str(path)
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)

    return mounted()

"""Restore onto another mesh: the tiny job trained on mesh (data, fsdp, tensor) = (8, 1, 1) with a
checkpoint at step K, that checkpoint copied into a new run directory and continued to N on mesh
(2, 2, 2), follows the uninterrupted (8, 1, 1) run: per-step losses after K and the final
parameters, optimizer state and cache agree within float32 reduction-order tolerance (docs/training.md:
1e-5 relative).

Real Orbax on disk, the real Grain loader (stdlib corpus) and real training, in this process (its
8 fake CPU devices). The tiny job (every layer kind) divides on both meshes: batch 8 over
data x fsdp = 8 or 4, 2 heads over tensor = 2, d_model 32 over fsdp = 2."""

import logging
import os

import jax
import numpy as np
import yaml
from jax.sharding import PartitionSpec as P

from tests.helpers.runs import copy_checkpoint, read_checkpoint, train_in_process
from tests.helpers.tiny import REFERENCE_JOB

N, K = REFERENCE_JOB["train"]["steps"], 2
MESH_222 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def assert_trees_close(got, want, what: str) -> None:
    paths = jax.tree_util.tree_leaves_with_path(got)
    want_leaves = jax.tree_util.tree_leaves(want)
    assert len(paths) == len(want_leaves), what
    for (path, a), b in zip(paths, want_leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                                   err_msg=what + jax.tree_util.keystr(path))


def test_restore_on_222_continues_the_811_run(tiny_reference, tmp_path, caplog):
    ref_dir, ref = tiny_reference
    run_dir = str(tmp_path / "resharded")
    copy_checkpoint(ref_dir, run_dir, K)
    with caplog.at_level(logging.INFO, logger="bst_dist.train"):
        got = train_in_process(REFERENCE_JOB, run_dir, MESH_222)
    messages = [r.getMessage() for r in caplog.records]
    assert any("mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in m for m in messages), messages
    assert any(m.startswith("resumed from") and m.endswith(f"step {K}") for m in messages), messages
    with open(os.path.join(run_dir, "job.yaml")) as f:
        assert yaml.safe_load(f)["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "rules": [], "device_order": "default",
                                             "dcn": {}}

    assert got["start_step"] == K and got["final_step"] == N and got["tokens_seen"] == ref["tokens_seen"]
    np.testing.assert_allclose(got["losses"], ref["losses"][K:], rtol=1e-5, atol=0)

    # The final checkpoints of both runs, as written: the same values, different layouts.
    mine, theirs = read_checkpoint(run_dir, N), read_checkpoint(ref_dir, N)
    embed = mine["state"]["params"]["embed"]["value"]
    assert dict(embed.sharding.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert embed.sharding.spec == P("tensor", "fsdp")  # vocab x embed, really resharded
    assert int(mine["state"]["step"]) == int(theirs["state"]["step"]) == N
    assert mine["data"]["lanes"] == theirs["data"]["lanes"]  # the same data position
    for item in ("params", "opt_state"):
        assert_trees_close(mine["state"][item], theirs["state"][item], item)
    assert_trees_close(mine["cache"], theirs["cache"], "cache")

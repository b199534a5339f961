"""ops/plan_memory: the real train step compiled ahead of time for a mesh, nothing allocated."""

import pytest

from bst_dist import config
from ops.plan_memory import plan

from tests.helpers.tiny import TINY_JOB



def test_plan_reports_per_device_memory_and_flops():
    cfg = config.from_dict(TINY_JOB, ["mesh.data=4", "mesh.fsdp=2"])
    out = plan(cfg)
    assert out["devices"] == 8 and out["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
    # the compiled step's arguments are exactly one device's shards of params, AdamW mu/nu, cache
    # and batch, as the analytic floor counts them (the step counter's few bytes aside)
    from bst_dist import parallel
    from bst_dist.parallel.plan import resident_bytes

    floor = resident_bytes(cfg, parallel.make_mesh(cfg.mesh))
    assert 0 <= floor["optimizer"] - 2 * floor["params"] < 1024  # AdamW mu and nu, sharded like params, + counts
    assert abs(out["argument_gib"] * 2**30 - floor["total"]) <= 64
    # XLA counts every op, the model count only matmuls, attention and the SSM: at least as many,
    # and no hidden second forward (remat is off) that would add a third or more
    ratio = out["flops_per_device"] * out["devices"] / out["model_flops_per_step"]
    assert 1.0 <= ratio < 1.6, ratio


def test_plan_refuses_a_mesh_that_does_not_fit():
    cfg = config.from_dict(TINY_JOB, ["mesh.data=3"])
    with pytest.raises(config.ConfigError, match="does not match the 8 devices"):
        plan(cfg)

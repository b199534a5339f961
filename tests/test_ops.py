"""ops/plan_memory: the real train step compiled ahead of time for a mesh, nothing allocated."""

import pytest

from bst_dist import config
from ops.plan_memory import plan
from train_utils import TINY_JOB


def test_plan_reports_per_device_memory_and_flops():
    cfg = config.from_dict(TINY_JOB, ["mesh.data=4", "mesh.fsdp=2"])
    out = plan(cfg)
    assert out["devices"] == 8 and out["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
    # arguments hold params + AdamW mu/nu (3 x float32) sharded over fsdp=2, plus the cache and batch
    from bst_dist.runs.describe import count_params

    n = count_params(cfg.model)["total"]
    assert 3 * 4 * n / 2 / 2**30 * 0.9 < out["argument_gib"] < 3 * 4 * n / 2**30 * 1.1
    assert out["flops_per_device"] > 0


def test_plan_refuses_a_mesh_that_does_not_fit():
    cfg = config.from_dict(TINY_JOB, ["mesh.data=3"])
    with pytest.raises(config.ConfigError, match="does not match the 8 devices"):
        plan(cfg)

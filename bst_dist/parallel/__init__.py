"""Meshes, logical-axis rules and the shardings derived from them."""

from bst_dist.parallel.mesh import AXES, make_mesh, mesh_shape
from bst_dist.parallel.rules import (DEFAULT_RULES, batch_axis_size, batch_sharding, cache_shardings, create_sharded,
                                     rules_from_config, spec_for, state_shardings)

__all__ = ["AXES", "DEFAULT_RULES", "batch_axis_size", "batch_sharding", "cache_shardings", "create_sharded",
           "make_mesh", "mesh_shape", "rules_from_config", "spec_for", "state_shardings"]

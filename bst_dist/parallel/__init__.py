"""Meshes, logical-axis rules, the shardings derived from them, and the lanes each process feeds."""

from bst_dist.parallel.lanes import (LaneAssignmentError, check_partition, device_rows, lane_assignment,
                                     process_lanes)
from bst_dist.parallel.mesh import AXES, make_mesh, mesh_shape
from bst_dist.parallel.rules import (DEFAULT_RULES, batch_axis_size, batch_sharding, cache_shardings, check_fits,
                                     create_sharded, rules_from_config, spec_for, state_shardings)
from bst_dist.parallel.trace import LaneTrace

__all__ = ["AXES", "DEFAULT_RULES", "LaneAssignmentError", "LaneTrace", "batch_axis_size", "batch_sharding",
           "cache_shardings", "check_fits", "check_partition", "create_sharded", "device_rows", "lane_assignment",
           "make_mesh", "mesh_shape", "process_lanes", "rules_from_config", "spec_for", "state_shardings"]

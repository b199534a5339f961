"""Test set-up: 8 fake CPU devices (before jax is imported), float32 matmuls, a shared cache dir."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# One prepared-corpus cache for every test process of a run (ensure_prepared holds a file lock,
# so parallel workers prepare the stdlib corpus once).
import tempfile  # noqa: E402

os.environ.setdefault("BST_DIST_CACHE", os.path.join(tempfile.gettempdir(), "bst_dist_test_cache"))

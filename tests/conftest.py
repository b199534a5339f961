"""Test set-up for every area: 8 fake CPU devices (before jax is imported), float32 matmuls, a shared
cache dir; and the fixtures that several areas use. An area's own fixtures are in its conftest.py,
plain helpers shared by several areas in tests/helpers/ (docs/testing.md)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# One prepared-corpus cache for every test process of a run (ensure_prepared holds a file lock,
# so parallel workers prepare the stdlib corpus once).
import tempfile  # noqa: E402

os.environ.setdefault("BST_DIST_CACHE", os.path.join(tempfile.gettempdir(), "bst_dist_test_cache"))
# No persistent compilation cache shared by the test processes unless a test names one
# (train.compile_cache): every test compiles what it runs, as in a fresh process.
os.environ.setdefault("BST_DIST_COMPILE_CACHE", "")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
    """One uninterrupted run of helpers.tiny.REFERENCE_JOB (in this process, mesh (8, 1, 1)), shared
    by the train and generate tests that compare against it: (run dir, summary). Treat the
    directory as read-only (copy it to change it)."""
    from tests.helpers.runs import checkpoint_steps, train_in_process
    from tests.helpers.tiny import REFERENCE_JOB

    run_dir = str(tmp_path_factory.mktemp("tiny_reference") / "run")
    summary = train_in_process(REFERENCE_JOB, run_dir)
    assert summary["start_step"] == 0 and checkpoint_steps(run_dir) == [2, 4, 6]
    return run_dir, summary

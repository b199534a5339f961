"""The repository's paths, defined once for every test (and for the subprocesses they start)."""

import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)
JOBS = os.path.join(REPO, "jobs")
LOCAL_TINY = os.path.join(JOBS, "local_tiny.yaml")
CLUSTER = os.path.join(REPO, "cluster")
FIXTURES = os.path.join(TESTS, "fixtures")
GOLDEN = os.path.join(TESTS, "golden")
SCHEMAS = os.path.join(TESTS, "schemas")

"""cluster/: every YAML parses; every job file a cluster file names exists (and loads); every
RayJob's entrypoint is a `bst-dist` command the CLI has; launcher YAMLs are complete and keep
the dashboard on 127.0.0.1 with token auth; KubeRay objects keep their Services private."""

from __future__ import annotations

import glob
import os
import re
import shlex

import pytest
import yaml

from bst_dist import config
from bst_dist.commands import main as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(REPO, "cluster")
YAMLS = sorted(glob.glob(os.path.join(CLUSTER, "**", "*.yaml"), recursive=True))
FILES = sorted(p for p in glob.glob(os.path.join(CLUSTER, "**", "*"), recursive=True) if os.path.isfile(p))
LAUNCHERS = [p for p in YAMLS if os.path.dirname(p) == CLUSTER]
JOB_REF = re.compile(r"(?:/app/)?(jobs/[\w./-]+?\.yaml)")


def _docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _job_file(ref: str) -> str:
    """`jobs/x.yaml` or the image path `/app/jobs/x.yaml` -> the file in this checkout."""
    return os.path.join(REPO, ref.split("/app/", 1)[-1])


def test_cluster_has_the_promised_files():
    names = {os.path.relpath(p, CLUSTER) for p in FILES}
    assert {"gcp-tpu-v5p.yaml", "gcp-gpu-h100.yaml", "README.md", "kuberay/raycluster-gpu.yaml",
            "kuberay/raycluster-tpu.yaml", "kuberay/rayjob-gpu.yaml", "kuberay/rayjob-tpu.yaml"} <= names


class _NoDuplicateKeys(yaml.SafeLoader):
    """Safe YAML that refuses a key twice in one mapping (plain PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        assert not dup, f"duplicate key {dup[0]} in the mapping at line {node.start_mark.line + 1}"
        return super().construct_mapping(node, deep)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: os.path.relpath(p, REPO))
def test_yaml_parses(path):
    """Every document is a mapping without duplicate keys that says what it is: a launcher config
    (cluster_name) or a Kubernetes object (apiVersion, kind, metadata.name)."""
    with open(path) as f:
        docs = [d for d in yaml.load_all(f, Loader=_NoDuplicateKeys) if d is not None]
    assert docs
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is a {type(d).__name__}, not a mapping"
        named = d.get("apiVersion") and d.get("kind") and (d.get("metadata") or {}).get("name")
        assert "cluster_name" in d or named, f"{path}: a document is neither a launcher config nor a named object"


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_named_job_file_exists_and_loads(path):
    with open(path) as f:
        refs = set(JOB_REF.findall(f.read()))
    for ref in refs:
        job = _job_file(ref)
        assert os.path.isfile(job), f"{os.path.relpath(path, REPO)} names {ref}, which does not exist"
        config.load(job)


def _entrypoints():
    for path in YAMLS:
        for doc in _docs(path):
            if doc.get("kind") == "RayJob":
                yield os.path.relpath(path, REPO), doc["spec"]["entrypoint"]


@pytest.mark.parametrize("where,entrypoint", list(_entrypoints()))
def test_rayjob_entrypoint_is_a_bst_dist_command_on_an_existing_job(where, entrypoint):
    argv = shlex.split(entrypoint)
    assert argv[0] == "bst-dist", f"{where}: the image puts `bst-dist` on PATH; use it"
    args = cli.build_parser().parse_args(argv[1:])
    assert args.command == "train"
    assert os.path.isfile(_job_file(args.job)), f"{where}: {args.job} is not in jobs/"
    config.load(_job_file(args.job), args.overrides)


@pytest.mark.parametrize("path", LAUNCHERS, ids=os.path.basename)
def test_launcher_is_complete_and_private(path):
    (c,) = _docs(path)
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in c, f"{path}: no {key}"
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != c["head_node_type"]) <= c["max_workers"]
    head = " ".join(c["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=127.0.0.1" in head
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in c["head_start_ray_commands"] + c["worker_start_ray_commands"])
    assert "/home/ubuntu/.ray/auth_token" in c["file_mounts"]
    setup = " ".join(c["setup_commands"])
    assert "bst_dist[" in setup and "ray[default,train]==2.60.0" in setup
    for name, t in types.items():
        nc = t["node_config"]
        if "acceleratorType" in nc:  # a TPU slice: a type Ray recognizes, no external IPs
            from ray._private.accelerators import TPUAcceleratorManager

            assert TPUAcceleratorManager.is_valid_tpu_accelerator_type(nc["acceleratorType"])
            assert nc["networkConfig"]["enableExternalIps"] is False
        else:
            assert all(ni.get("accessConfigs") == [] for ni in nc["networkInterfaces"]), f"{name}: external IP"


@pytest.mark.parametrize("path", [p for p in YAMLS if "/kuberay/" in p], ids=os.path.basename)
def test_kuberay_objects_are_private(path):
    for doc in _docs(path):
        assert doc["apiVersion"] in ("ray.io/v1", "networking.k8s.io/v1")
        if doc["kind"] not in ("RayCluster", "RayJob"):
            continue
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["rayVersion"] == "2.60.0"
        assert spec["authOptions"] == {"mode": "token"}
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        for group in spec["workerGroupSpecs"]:
            res = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert res.get("nvidia.com/gpu") == "8" or res.get("google.com/tpu") == "4"


def test_dockerfile_installs_the_project_with_an_accelerator_extra():
    with open(os.path.join(CLUSTER, "docker", "Dockerfile")) as f:
        text = f.read()
    assert re.search(r"^FROM ", text, re.M) and "ARG EXTRA=" in text
    assert 'pip install --no-cache-dir "/app[${EXTRA}]"' in text
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        pyproject = f.read()
    for extra in ("gpu", "tpu"):
        assert re.search(rf"^{extra} = \[", pyproject, re.M), f"pyproject.toml has no [{extra}] extra"

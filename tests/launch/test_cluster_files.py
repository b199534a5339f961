"""cluster/ and the image files: every YAML parses; every job file a cluster file names exists
(and loads); launcher YAMLs pass Ray's own schema and config preparation, run the project image
(Python >= 3.11) with internal IPs only, service accounts and the autoscaler's GCP client; KubeRay
objects pass the v1.7.0 CRD schemas (unknown fields included) and keep their Services private
while admitting the operator and Prometheus; scaling, retries and grace periods fit the jobs."""

from __future__ import annotations

import copy
import glob
import json
import os
import re
import shlex

import jsonschema
import pytest
import yaml

from bst_dist import config
from bst_dist.commands import main as cli

from tests.helpers.paths import CLUSTER, REPO, SCHEMAS

YAMLS = sorted(glob.glob(os.path.join(CLUSTER, "**", "*.yaml"), recursive=True))
FILES = sorted(p for p in glob.glob(os.path.join(CLUSTER, "**", "*"), recursive=True) if os.path.isfile(p))
LAUNCHERS = [p for p in YAMLS if os.path.dirname(p) == CLUSTER]
KUBERAY = [p for p in YAMLS if "/kuberay/" in p]
JOB_REF = re.compile(r"(?:/app/)?(jobs/[\w./-]+?\.yaml)")
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
PREEMPTION_NOTICE_S = 30  # GCE Spot / GKE Spot and TPU preemption: ~30 s from SIGTERM to power-off


def _docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _read(*parts):
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def _job_file(ref: str) -> str:
    """`jobs/x.yaml` or the image path `/app/jobs/x.yaml` -> the file in this checkout."""
    return os.path.join(REPO, ref.split("/app/", 1)[-1])


def _refs(path):
    with open(path) as f:
        return sorted(set(JOB_REF.findall(f.read())))


def test_cluster_has_the_promised_files():
    names = {os.path.relpath(p, CLUSTER) for p in FILES}
    assert {"gcp-tpu-v5p.yaml", "gcp-gpu-h100.yaml", "README.md", "kuberay/raycluster-gpu.yaml",
            "kuberay/raycluster-tpu.yaml", "kuberay/rayjob-gpu.yaml", "kuberay/rayjob-tpu.yaml",
            "kuberay/networkpolicy.yaml", "kuberay/serviceaccount.yaml"} <= names


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


@pytest.mark.parametrize("path", [p for p in YAMLS if any(d.get("kind") in ("RayCluster", "RayJob") for d in _docs(p))]
                         + LAUNCHERS + [os.path.join(CLUSTER, "README.md")], ids=lambda p: os.path.relpath(p, REPO))
def test_every_cluster_file_names_a_job(path):
    assert _refs(path), f"{os.path.relpath(path, REPO)} names no jobs/*.yaml to run on it"


@pytest.mark.parametrize("where,ref", [(os.path.relpath(p, REPO), r) for p in FILES for r in _refs(p)])
def test_every_named_job_file_exists_and_loads(where, ref):
    job = _job_file(ref)
    assert os.path.isfile(job), f"{where} names {ref}, which does not exist"
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


# ---- cluster launcher ---------------------------------------------------------------------------

def _ray_schema():
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("path", LAUNCHERS, ids=os.path.basename)
def test_launcher_passes_rays_schema_and_config_preparation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    (c,) = _docs(path)
    jsonschema.validate(c, _ray_schema())  # what `ray up` checks first
    prepared = prepare_config(copy.deepcopy(c))  # `ray up`'s defaults merge, offline part
    validate_config(prepared)
    assert prepared["docker"]["image"] == c["docker"]["image"]


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
    # The token file lands in the container user's home (the image's user is `ray`).
    assert "/home/ray/.ray/auth_token" in c["file_mounts"]
    for name, t in types.items():
        nc = t["node_config"]
        if "acceleratorType" in nc:  # a TPU slice: a type Ray recognizes, no external IPs
            from ray._private.accelerators import TPUAcceleratorManager

            assert TPUAcceleratorManager.is_valid_tpu_accelerator_type(nc["acceleratorType"])
            assert nc["networkConfig"]["enableExternalIps"] is False
        else:
            assert all(ni.get("accessConfigs") == [] for ni in nc["networkInterfaces"]), f"{name}: external IP"


@pytest.mark.parametrize("path", LAUNCHERS, ids=os.path.basename)
def test_launcher_uses_internal_ips(path):
    """Nodes without external IPs: without use_internal_ips, `ray up` waits for an external IP."""
    (c,) = _docs(path)
    assert c["provider"].get("use_internal_ips") is True, f"{path}: provider.use_internal_ips must be true"


@pytest.mark.parametrize("path", LAUNCHERS, ids=os.path.basename)
def test_launcher_runs_the_project_image_with_python_311(path):
    """Ubuntu 22.04 gives Python 3.10; every node runs the project image instead, whose base
    image (the Dockerfile's BASE) carries Python >= 3.11."""
    (c,) = _docs(path)
    docker = c.get("docker") or {}
    assert re.fullmatch(r"[\w.:/-]*bst-dist:(gpu|tpu)", docker.get("image", "")), \
        f"{path}: docker.image must be the project image (Dockerfile), got {docker.get('image')!r}"
    for t in c["available_node_types"].values():
        assert "docker" not in t or t["docker"].get("worker_image", docker["image"]) == docker["image"]
    base = re.search(r"^ARG BASE=\S+-py3(\d+)", _read("Dockerfile"), re.M)
    assert base and int(base.group(1)) >= 11, "Dockerfile: the base image must carry Python >= 3.11"
    accel = docker["image"].rsplit(":", 1)[1]
    if accel == "gpu":
        assert "--gpus all" in docker.get("worker_run_options", []) and \
            not any("--gpus" in o for o in docker.get("run_options", []) + docker.get("head_run_options", [])), \
            "--gpus on the GPU workers only (docker refuses it on the CPU head)"
    # Commands inside the container use the image's interpreter, not a venv of the host.
    for cmd in c["setup_commands"] + c["head_start_ray_commands"] + c["worker_start_ray_commands"]:
        assert "~/venv" not in cmd and "pip install" not in cmd, f"{path}: {cmd!r}: the image holds the deps"


@pytest.mark.parametrize("path", LAUNCHERS, ids=os.path.basename)
def test_launcher_head_has_the_gcp_autoscaler_client(path):
    """Ray's GCP autoscaler (on the head) creates workers through google-api-python-client."""
    (c,) = _docs(path)
    assert any("import googleapiclient" in cmd for cmd in c.get("head_setup_commands", []))
    assert re.search(r'^gcp = \[[^\]]*"google-api-python-client', _read("pyproject.toml"), re.M)
    assert re.search(r'pip install [^\n]*-c /app/constraints\.txt [^\n]*"/app\[\$\{EXTRA\},gcp\]"', _read("Dockerfile"))


@pytest.mark.parametrize("path", LAUNCHERS, ids=os.path.basename)
def test_launcher_workers_have_a_service_account_with_a_scope_for_the_bucket(path):
    (c,) = _docs(path)
    for name, t in c["available_node_types"].items():
        if name == c["head_node_type"]:
            continue  # Ray sets the head's (ray-autoscaler-sa-v1, cloud-platform scope) itself
        nc = t["node_config"]
        if "acceleratorType" in nc:  # TPU API: one serviceAccount with `scope`
            sa = nc.get("serviceAccount") or {}
            assert sa.get("email") and CLOUD_PLATFORM in sa.get("scope", []), f"{name}: serviceAccount"
        else:
            sas = nc.get("serviceAccounts") or []
            assert sas and all(s.get("email") and CLOUD_PLATFORM in s.get("scopes", []) for s in sas), name


def test_cluster_readme_says_how_to_reach_private_nodes():
    text = _read("cluster", "README.md")
    for needed in ("Cloud NAT", "bastion", "IAP", "use_internal_ips", "roles/storage.objectUser",
                   "Workload Identity", "RAY_JOB_STOP_WAIT_TIME_S"):
        assert needed in text, f"cluster/README.md does not explain {needed}"


# ---- KubeRay ------------------------------------------------------------------------------------

def _crd_schema(kind):
    with open(os.path.join(SCHEMAS, f"kuberay-{kind.lower()}s-v1.7.0.json")) as f:
        return json.load(f)


def _unknown_fields(obj, schema, where=""):
    """Fields the API server would silently prune: under a schema with `properties` and neither
    `additionalProperties` nor `x-kubernetes-preserve-unknown-fields`."""
    if isinstance(obj, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in obj.items():
            if props is not None and k in props:
                yield from _unknown_fields(v, props[k], f"{where}.{k}")
            elif isinstance(extra, dict):
                yield from _unknown_fields(v, extra, f"{where}.{k}")
            elif props is not None and not extra and not schema.get("x-kubernetes-preserve-unknown-fields"):
                yield f"{where}.{k}"
    elif isinstance(obj, list) and "items" in schema:
        for i, v in enumerate(obj):
            yield from _unknown_fields(v, schema["items"], f"{where}[{i}]")


def _ray_objects():
    for path in KUBERAY:
        for doc in _docs(path):
            if doc["kind"] in ("RayCluster", "RayJob"):
                yield pytest.param(doc, id=f"{os.path.basename(path)}:{doc['kind']}")


@pytest.mark.parametrize("doc", list(_ray_objects()))
def test_kuberay_object_passes_the_crd_schema(doc):
    schema = _crd_schema(doc["kind"])
    jsonschema.validate(doc, schema)
    assert not list(_unknown_fields(doc, schema)), "fields the API server prunes"


def test_the_unknown_field_check_catches_a_misspelling():
    (doc,) = [d for d in _docs(os.path.join(CLUSTER, "kuberay", "rayjob-gpu.yaml"))]
    doc = copy.deepcopy(doc)
    doc["spec"]["backofLimit"] = 2
    assert list(_unknown_fields(doc, _crd_schema("RayJob"))) == [".spec.backofLimit"]


def _cluster_spec(doc):
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _pod_specs(doc):
    spec = _cluster_spec(doc)
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"]


@pytest.mark.parametrize("path", KUBERAY, ids=os.path.basename)
def test_kuberay_objects_are_private(path):
    for doc in _docs(path):
        assert doc["apiVersion"] in ("ray.io/v1", "networking.k8s.io/v1", "v1")
        if doc["kind"] not in ("RayCluster", "RayJob"):
            continue
        spec = _cluster_spec(doc)
        assert spec["rayVersion"] == "2.60.0"
        assert spec["authOptions"] == {"mode": "token"}
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        for group in spec["workerGroupSpecs"]:
            res = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert res.get("nvidia.com/gpu") == "8" or res.get("google.com/tpu") == "4"


def _policy_admits(policy, port, namespace_selected: bool) -> bool:
    for rule in policy["spec"]["ingress"]:
        ports = [p.get("port") for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        if any(("namespaceSelector" in peer) == namespace_selected for peer in rule.get("from", [])):
            return True
    return False


def test_networkpolicy_admits_the_operator_to_the_dashboard_and_prometheus_to_metrics():
    """The operator follows a RayJob through the head's job server (8265); without it a RayJob
    whose training succeeded is marked Failed. Prometheus scrapes 8080. Both from other namespaces."""
    (policy,) = _docs(os.path.join(CLUSTER, "kuberay", "networkpolicy.yaml"))
    assert _policy_admits(policy, 8265, namespace_selected=True), "the operator's namespace -> 8265"
    assert _policy_admits(policy, 8080, namespace_selected=True), "Prometheus's namespace -> 8080"
    for rule in policy["spec"]["ingress"]:
        if any("namespaceSelector" in peer for peer in rule["from"]):
            assert rule.get("ports"), "another namespace is admitted to named ports only"


@pytest.mark.parametrize("doc", list(_ray_objects()))
def test_kuberay_scales_up_to_max_replicas_only_with_the_autoscaler(doc):
    spec = _cluster_spec(doc)
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        if g["maxReplicas"] > g["replicas"]:
            assert spec.get("enableInTreeAutoscaling") is True, \
                f"{g['groupName']}: maxReplicas {g['maxReplicas']} > replicas {g['replicas']} needs the autoscaler"


@pytest.mark.parametrize("doc", [p for p in _ray_objects() if p.values[0]["kind"] == "RayJob"])
def test_rayjob_retries_a_failed_run(doc):
    assert doc["spec"].get("backoffLimit", 0) >= 1, "backoffLimit: a lost run resumes from its checkpoint"


def test_every_named_service_account_has_a_manifest():
    named = {ps.get("serviceAccountName") for p in KUBERAY for d in _docs(p) if d["kind"] in ("RayCluster", "RayJob")
             for _, ps in _pod_specs(d)} - {None}
    have = {d["metadata"]["name"]: d for p in KUBERAY for d in _docs(p) if d["kind"] == "ServiceAccount"}
    assert named and named <= set(have), f"ServiceAccounts named but not in cluster/kuberay: {named - set(have)}"
    for sa in have.values():
        assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")


@pytest.mark.parametrize("doc", list(_ray_objects()))
def test_grace_periods_fit_preemption_and_the_driver_waits_inside_them(doc):
    """SIGTERM -> the stop event -> a final save -> exit, within the ~30 s a Spot/TPU node gets;
    the head's RAY_JOB_STOP_WAIT_TIME_S (how long the job server waits for the driver before
    SIGKILL) lies inside the head's grace period."""
    for name, ps in _pod_specs(doc):
        grace = ps.get("terminationGracePeriodSeconds")
        assert grace is not None and 0 < grace <= PREEMPTION_NOTICE_S, f"{name}: terminationGracePeriodSeconds {grace}"
    head = _cluster_spec(doc)["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in head["containers"][0].get("env", [])}
    assert 0 < int(env["RAY_JOB_STOP_WAIT_TIME_S"]) < head["terminationGracePeriodSeconds"]


# ---- image --------------------------------------------------------------------------------------

def test_dockerfile_installs_the_project_with_an_accelerator_extra_and_the_constraints():
    text = _read("Dockerfile")
    assert re.search(r"^FROM ", text, re.M) and "ARG EXTRA=" in text
    assert re.search(r"^COPY [^\n]*constraints\.txt", text, re.M)
    pyproject = _read("pyproject.toml")
    for extra in ("gpu", "tpu"):
        assert re.search(rf"^{extra} = \[", pyproject, re.M), f"pyproject.toml has no [{extra}] extra"
    assert not os.path.exists(os.path.join(CLUSTER, "docker", "Dockerfile")), "one Dockerfile, at the top"


def test_dockerignore_keeps_venvs_and_runs_out_of_every_layer():
    lines = {ln.strip().rstrip("/") for ln in _read(".dockerignore").splitlines() if ln.strip() and not ln.startswith("#")}
    for needed in (".venv", "runs", ".git"):
        assert needed in lines, f".dockerignore does not exclude {needed}"


def _pins():
    pins = {}
    for ln in _read("constraints.txt").splitlines():
        if ln.strip() and not ln.startswith("#"):
            name, _, version = ln.partition("==")
            assert version, f"constraints.txt: {ln!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    return pins


def test_constraints_pin_every_dependency_and_match_the_image():
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    pins = _pins()
    reqs = project["dependencies"] + project["optional-dependencies"]["gcp"]
    for req in reqs:
        name = re.sub(r"[-_.]+", "-", re.match(r"[\w.-]+", req).group(0).lower())
        assert name in pins, f"constraints.txt does not pin {name}"
    base = re.search(r"^ARG BASE=rayproject/ray:([\d.]+)-", _read("Dockerfile"), re.M).group(1)
    assert pins["ray"] == base, "constraints.txt's ray and the image's base must agree"
    for doc in (d for p in KUBERAY for d in _docs(p) if d["kind"] in ("RayCluster", "RayJob")):
        assert _cluster_spec(doc)["rayVersion"] == pins["ray"]

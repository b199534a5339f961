"""`bst-dist plan`: the real train step compiled ahead of time for a TPU topology on this CPU host
(libtpu describes the slice), and the one-line refusals that come before any compilation."""

import subprocess
import sys

import pytest

from bst_dist import config
from bst_dist.parallel.plan import DoesNotFit, plan

from tests.helpers.paths import REPO
from tests.helpers.runs import CompileCounter
from tests.helpers.tiny import TINY_JOB



def _topology(name, slices=1):
    from bst_dist.parallel.topology import libtpu_present, topology_devices

    if not libtpu_present():
        pytest.skip('libtpu is absent: the tpu extra (pip install "jax[tpu]==0.10.2") describes TPU topologies')
    return topology_devices(name, slices)


def test_a_batch_the_mesh_cannot_split_is_refused_before_compiling():
    cfg = config.from_dict(TINY_JOB, ["mesh.data=8", "train.global_batch_size=12"])
    with CompileCounter() as compiles, pytest.raises(config.ConfigError) as e:
        plan(cfg)
    assert str(e.value) == ("train.global_batch_size: global_batch_size 12 is not divisible by the data-parallel "
                            "size (data x fsdp = 8)")
    assert compiles.count == 0


def test_cli_bad_input_is_one_line(tmp_path):
    job = tmp_path / "job.yaml"
    import yaml

    job.write_text(yaml.safe_dump(TINY_JOB))
    env = {"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "bst_dist", "plan", str(job), "--slices", "2"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 2
    assert p.stderr.strip() == "bst-dist plan: error: --slices: needs --topology (the slices of which TPU)"


@pytest.mark.slow
def test_tiny_job_compiles_for_v5p_32():
    devs = _topology("v5p-32")
    cfg = config.from_dict(TINY_JOB, ["train.global_batch_size=16"])
    p = plan(cfg, devs)
    assert p["devices"] == 16 and p["hosts"] == 4 and p["mesh"] == {"data": 16, "fsdp": 1, "tensor": 1}
    assert p["hbm_gib"] == 95.0 and p["fits"]
    # the compiled arguments hold at least the resident state the analytic bound counts
    assert p["argument_gib"] >= 0.99 * p["resident_gib"]["total"]
    assert p["peak_gib_estimate"] >= p["argument_gib"]
    assert p["flops_per_device"] > 0 and p["step_time_s_estimate"] > 0


def test_a_job_over_hbm_is_refused_with_the_shortfall_and_a_mesh_that_fits():
    devs = _topology("v5p-8")  # 4 chips, one host
    # ~10.5B parameters: 12 bytes each (float32 weights, AdamW mu and nu) is ~118 GiB on a data-only mesh
    cfg = config.from_dict(TINY_JOB, ["model.d_model=16384", "model.num_heads=16", "model.head_dim=1024",
                                      "model.mlp_dim=65536", "model.num_layers=3", "model.bst_layers=[]",
                                      "model.brect_layers=[]", "train.global_batch_size=4"])
    with CompileCounter() as compiles, pytest.raises(DoesNotFit) as e:
        plan(cfg, devs)
    msg = str(e.value)
    assert "\n" not in msg and compiles.count == 0
    assert msg.startswith("mesh {'data': 4, 'fsdp': 1, 'tensor': 1}: the train state, cache and batch alone need ")
    assert "HBM is 95.0 GiB (short by " in msg and msg.endswith(
        "try --set mesh.data=2 --set mesh.fsdp=1 --set mesh.tensor=2")
    p = plan(config.from_dict(TINY_JOB, [*cfg_overrides(cfg), "mesh.data=2", "mesh.tensor=2"]), devs,
             compile_step=False)
    assert p["resident_gib"]["total"] < 95.0


def cfg_overrides(cfg):
    m = cfg.model
    return [f"model.d_model={m.d_model}", f"model.num_heads={m.num_heads}", f"model.head_dim={m.head_dim}",
            f"model.mlp_dim={m.mlp_dim}", f"model.num_layers={m.num_layers}", "model.bst_layers=[]",
            "model.brect_layers=[]", f"train.global_batch_size={cfg.train.global_batch_size}"]


def test_a_dcn_axis_on_one_slice_is_refused_before_compiling():
    devs = _topology("v5p-8")  # one slice of 4 chips
    cfg = config.from_dict(TINY_JOB, ["mesh.dcn.data=2", "train.global_batch_size=4"])
    with CompileCounter() as compiles, pytest.raises(config.ConfigError) as e:
        plan(cfg, devs)
    assert str(e.value) == ("mesh.dcn.data: 2 slices asked for, but the 4 devices are one slice; drop mesh.dcn on "
                            "a single slice")
    assert compiles.count == 0


def test_out_writes_the_plan_with_its_command_and_versions(tmp_path):
    """`--out PATH`: the record committed under bench/results/plans/ (here the devices present,
    unbounded HBM, no compilation: the record's shape, not the figures)."""
    import json

    import yaml

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(TINY_JOB))
    out = tmp_path / "plans" / "tiny.json"
    env = {"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "PATH": "/usr/bin:/bin",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    p = subprocess.run([sys.executable, "-m", "bst_dist", "plan", str(job), "--set", "mesh.fsdp=2", "--no-compile",
                        "--out", str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["command"] == f"bst-dist plan {job} --set mesh.fsdp=2 --no-compile"
    import jax

    assert rec["versions"]["jax"] == jax.__version__ and "libtpu" in rec["versions"]
    assert rec["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1} and rec["devices"] == 8
    assert rec["model_flops_per_step"] > 0 and rec["resident_gib"]["total"] > 0
    assert p.stdout.startswith("8 cpu devices on 1 host(s), mesh data=4 x fsdp=2 x tensor=1")

"""jobs/: every runnable job file (it starts with `#!/usr/bin/env -S bst-dist train`) is
executable and loads; every other file is included by one; the paper family holds what
docs/models.md fixes; each TPU variant is its GPU job with only the placement changed; every
`ray:` section makes a ScalingConfig that Ray itself accepts. No cluster, no JAX."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from bst_dist import config

from tests.helpers.paths import JOBS, REPO

SHEBANG = "#!/usr/bin/env -S bst-dist train"
# jobs/study/ holds study files and the job they vary (tests/study/test_study_files.py checks them)
FILES = sorted(p for p in glob.glob(os.path.join(JOBS, "**", "*.yaml"), recursive=True)
               if os.sep + "study" + os.sep not in p)


def _runnable(path: str) -> bool:
    with open(path) as f:
        return f.readline().rstrip("\n") == SHEBANG


ALL = [p for p in FILES if _runnable(p)]
PARTS = [p for p in FILES if not _runnable(p)]
ROWS = {  # file -> (paper row, bst_layers, brect_layers, variant, kernel)
    "pg19_200m_bst_sh_s4": ("BST:SH:S4", (0, 7, 9), (), "SH", "s4d"),
    "pg19_200m_bst_mh_s4": ("BST:MH:S4", (0, 7, 9), (), "MH", "s4d"),
    "pg19_200m_bst_mf_s4": ("BST:MF:S4", (0, 7, 9), (), "MF", "s4d"),
    "pg19_200m_bst_sh_unstruct": ("BST:SH:unstruct", (0, 7, 9), (), "SH", "unstruct"),
    "pg19_200m_bst_mf_unstruct": ("BST:MF:unstruct", (0, 7, 9), (), "MF", "unstruct"),
    "pg19_200m_brect_fixed_skip": ("BRecT:fixed:skip", (), (9,), None, None),
    "pg19_200m_slide_12l": ("Slide:12L", (), (), None, None),
    "pg19_200m_trsf_xl_2048": ("Trsf-XL:2048", (), (), None, None),
    "pg19_400m": ("BST:SH:S4-L", (0, 5, 7, 9), (), "SH", "s4d"),
}
# What a TPU variant may change: where it runs and where it writes.
PLACEMENT = {("ray",), ("data", "src"), ("data", "path"), ("train", "run_dir"), ("checkpoint", "dir"), ("name",)}


def _name(path: str) -> str:
    return os.path.basename(path)[: -len(".yaml")].removesuffix("_tpu_v5p")


# The family scaled past the papers' sizes: TPU jobs with no paper row (test_scaled_job_*)
SCALED = {"pg19_1b": {"topology": "4x4x8", "num_workers": 32, "mesh": {"data": 16, "fsdp": 8, "tensor": 1}}}
PAPER = [p for p in ALL if os.path.basename(p).startswith("pg19_") and _name(p) not in SCALED]
BASES = [p for p in PAPER if "/variants/" not in p]


def _includes(path: str) -> list[str]:
    with open(path) as f:
        inc = yaml.safe_load(f).get("include", [])
    return [os.path.realpath(os.path.join(os.path.dirname(path), i)) for i in ([inc] if isinstance(inc, str) else inc)]


def test_the_paper_family_is_all_there():
    assert sorted({_name(p) for p in BASES}) == sorted(ROWS)
    assert sorted(_name(p) for p in PAPER if "/variants/" in p) == sorted(ROWS)


@pytest.mark.parametrize("path", ALL, ids=lambda p: os.path.relpath(p, REPO))
def test_job_file_loads_and_is_executable(path):
    cfg = config.load(path)
    assert os.access(path, os.X_OK), f"{path}: chmod +x (it is run as `ray job submit -- {path}`)"
    assert cfg.name == os.path.basename(path)[: -len(".yaml")]


def test_every_other_file_is_an_include_part_of_some_job():
    """A file without the shebang is not run on its own: it must be reached from a runnable job
    (else it is dead), and it is not executable (so nobody submits it by mistake)."""
    reached, todo = set(), list(ALL)
    while todo:
        for inc in _includes(todo.pop()):
            if inc not in reached:
                reached.add(inc)
                todo.append(inc)
    assert PARTS, "the paper family has a shared base under jobs/base/"
    for part in PARTS:
        assert os.path.realpath(part) in reached, f"{os.path.relpath(part, REPO)} is included by no job"
        assert not os.access(part, os.X_OK), f"{part}: an included part is not a job; chmod -x"


@pytest.mark.parametrize("path", PAPER, ids=lambda p: os.path.relpath(p, REPO))
def test_paper_job_holds_the_spec(path):
    cfg = config.load(path)
    m, t = cfg.model, cfg.train
    row, bst, brect, variant, kernel = ROWS[_name(path)]
    assert cfg.description.startswith(f"{row} ")
    if path in BASES:  # the file says which table row it reproduces, and it is this row
        with open(path) as f:
            header = [ln for ln in f.read().splitlines() if ln.startswith("# Reproduces:")]
        assert len(header) == 1 and f'row "{row}"' in header[0]
    assert (m.vocab_size, m.d_model, m.num_heads, m.head_dim, m.mlp_dim) == (50257, 1024, 8, 128, 4096)
    assert m.dtype == "bfloat16"
    assert m.num_layers == (24 if _name(path) == "pg19_400m" else 12)
    assert (m.bst_layers, m.brect_layers) == (bst, brect)
    if variant:
        assert (m.bst.variant, m.bst.kernel) == (variant, kernel)
        if kernel == "s4d":
            assert m.bst.state_size == 16
        if variant == "MF":
            assert m.bst.num_context_states == 32
    if brect:
        assert (m.brect.num_states, m.brect.gate, m.brect.skip) == (512, "fixed", True)
    if _name(path) == "pg19_200m_trsf_xl_2048":
        assert m.block_len == m.seq_len == 2048
        assert t.global_batch_size == 64  # doubled: the same tokens per step as L=4096 x 32
    else:
        assert (m.block_len, m.seq_len, t.global_batch_size) == (512, 4096, 32)
    assert cfg.data.corpus == "pg19" and os.path.isabs(cfg.data.path) and os.path.isabs(cfg.data.src)
    assert os.path.isabs(t.run_dir) and t.run_dir.endswith("/" + cfg.name)
    tpu = "/variants/" in path
    r = cfg.ray
    if tpu:
        assert r.use_tpu and r.accelerator_type == "TPU-V5P" and r.resources_per_worker == {"TPU": 4}
        assert cfg.checkpoint.dir == f"gs://bst-dist-pg19/runs/{cfg.name}/checkpoints"
    else:
        assert r.use_gpu and r.resources_per_worker["GPU"] == 8  # one worker per host, all its GPUs
        assert cfg.data.path.startswith("/mnt/nfs/") and t.run_dir.startswith("/mnt/nfs/")
    assert r.max_failures > 0 and r.runtime_env.get("working_dir") == "."
    # Ray itself accepts the placement (topology / worker-count checks for TPUs included).
    pytest.importorskip("ray")
    from bst_dist.launch.ray_trainer import scaling_config

    sc = scaling_config(r)
    assert sc.num_workers == r.num_workers
    n_dev = r.num_workers * (4 if tpu else 8)
    assert t.global_batch_size % n_dev == 0, "global batch must split over the data-parallel devices"


def _without_placement(d: dict, prefix: tuple = ()) -> dict:
    return {k: _without_placement(v, prefix + (k,)) if isinstance(v, dict) and prefix + (k,) != ("ray",) else v
            for k, v in d.items() if prefix + (k,) not in PLACEMENT}


@pytest.mark.parametrize("base", BASES, ids=lambda p: os.path.basename(p))
def test_tpu_variant_is_the_same_job_placed_elsewhere(base):
    tpu = os.path.join(JOBS, "variants", f"{_name(base)}_tpu_v5p.yaml")
    a, b = config.to_dict(config.load(base)), config.to_dict(config.load(tpu))
    assert _without_placement(a) == _without_placement(b)
    assert a["train"]["run_dir"] != b["train"]["run_dir"] and a["data"]["path"] != b["data"]["path"]


def test_default_job_survives_a_killed_worker():
    """The README's default job restarts its worker group from the newest checkpoint (Ray Train's
    FailureConfig; tests/launch/test_launch_ray.py kills a real worker under the same setting); the
    bounded NaN stop is exempt from retries (tests/launch/test_launch_quiet.py)."""
    cfg = config.load(os.path.join(REPO, "jobs", "local_tiny.yaml"))
    assert cfg.ray.max_failures > 0 and cfg.checkpoint.every > 0


@pytest.mark.parametrize("name", sorted(SCALED))
def test_scaled_job_is_the_family_on_its_slice(name):
    """A scaled job keeps the family's vocabulary, head size, block and length, data and optimizer,
    and its placement adds up: one Ray worker per host, a mesh over every chip whose data x fsdp
    splits the batch into one sequence per chip."""
    from bst_dist import parallel
    from bst_dist.parallel.topology import chips, hosts_per_slice

    want = SCALED[name]
    path = os.path.join(REPO, "jobs", "variants", f"{name}_tpu_v5p.yaml")
    cfg = config.load(path)
    family = config.load(os.path.join(REPO, "jobs", "pg19_400m.yaml"))
    m, f = cfg.model, family.model
    assert (m.vocab_size, m.head_dim, m.block_len, m.seq_len, m.dtype) == \
        (f.vocab_size, f.head_dim, f.block_len, f.seq_len, f.dtype)
    assert (m.bst, m.bst_layers) == (f.bst, f.bst_layers)
    assert cfg.train.optimizer == family.train.optimizer and cfg.data.corpus == "pg19"
    r = cfg.ray
    assert r.use_tpu and r.topology == want["topology"] and r.num_workers == want["num_workers"]
    assert r.num_workers == hosts_per_slice(r.topology, r.accelerator_type)
    n = chips(r.topology)
    sizes = dict(zip(parallel.AXES, parallel.mesh_shape(cfg.mesh, n)))
    assert sizes == want["mesh"]
    assert cfg.train.global_batch_size == sizes["data"] * sizes["fsdp"] == n  # one sequence per chip
    # the same token budget as the family: steps x batch x L
    assert cfg.train.steps * cfg.train.global_batch_size == family.train.steps * family.train.global_batch_size
    assert cfg.checkpoint.dir == f"gs://bst-dist-pg19/runs/{cfg.name}/checkpoints"
    assert os.path.isabs(cfg.train.run_dir) and cfg.train.run_dir.endswith("/" + cfg.name)
    # the header's parameter count is true (tests/ops/test_job_params.py covers jobs/*.yaml)
    from ops.job_params import main

    assert main([path]) == 0

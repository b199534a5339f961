"""Every refusal at load time, one case per rule: the message is one bounded line that starts with
the key (or the file) it refuses. Mostly through `config.load`; the CLI cases check exit status 2,
one line on stderr, and that nothing was written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bst_dist import config
from bst_dist.config import ConfigError
from bst_dist.config.schema import MAX_MESSAGE
from bst_dist.config.yaml_file import MAX_BYTES

from tests.helpers.paths import LOCAL_TINY as TINY, REPO

HUGE = ["model.d_model=262144", "model.head_dim=65536"]

# (overrides on jobs/local_tiny.yaml: d=128, 4 heads x 32, 4 layers, W=64, L=256, batch 8) -> key
OVERRIDES = [
    # types (build.py)
    (["model.d_modl=3"], "model.d_modl"),
    (["train.stpes=3"], "train.stpes"),
    (["train.steps=abc"], "train.steps"),
    (["train.steps=1.5"], "train.steps"),
    (["train.steps=true"], "train.steps"),
    (["model.xl_cache=maybe"], "model.xl_cache"),
    (["model.bst.carry=1"], "model.bst.carry"),
    (["model.dtype=fp8"], "model.dtype"),
    (["model.bst.variant=XX"], "model.bst.variant"),
    (["train.remat=some"], "train.remat"),
    (["train.optimizer.name=sgd"], "train.optimizer.name"),
    (["data.corpus=wiki"], "data.corpus"),
    (["ray.placement_strategy=RANDOM"], "ray.placement_strategy"),
    (["train.optimizer.lr=abc"], "train.optimizer.lr"),
    (["train.optimizer.lr=.inf"], "train.optimizer.lr"),
    (["train.optimizer.lr=1e400"], "train.optimizer.lr"),  # 1e-notation reads as a float: inf
    (["model.dropout=.nan"], "model.dropout"),
    (["model.bst_layers=3"], "model.bst_layers"),
    (["model.bst_layers=[a]"], "model.bst_layers[0]"),
    (["data.src=[1]"], "data.src"),
    (["description=[1]"], "description"),
    (["model=3"], "model"),
    (["ray.runtime_env=3"], "ray.runtime_env"),
    (["mesh.rules=[[embed]]"], "mesh.rules[0]"),
    (["train"], "--set train"),
    (["=3"], "--set =3"),
    (["model..d_model=3"], "--set model..d_model=3"),
    # model
    (["model.d_model=0"], "model.d_model"),
    (["model.num_layers=0"], "model.num_layers"),
    (["model.vocab_size=0"], "model.vocab_size"),
    (["model.mlp_dim=-1"], "model.mlp_dim"),
    (["model.rel_buckets=0"], "model.rel_buckets"),
    (["model.vocab_multiple=0"], "model.vocab_multiple"),
    (["model.seq_len=100"], "model.seq_len"),
    (["model.num_heads=3"], "model.head_dim"),
    (["model.bst_layers=[4]"], "model.bst_layers"),
    (["model.bst_layers=[1, 1]"], "model.bst_layers"),
    (["model.brect_layers=[1]"], "model.bst_layers"),
    (["model.brect_layers=[-1]"], "model.brect_layers"),
    (["model.dropout=1.0"], "model.dropout"),
    (["model.attn_dropout=-0.1"], "model.attn_dropout"),
    (["model.attention_impl=cudnn"], "model.attention_impl"),  # local_tiny computes in float32
    (["model.bst.state_size=15"], "model.bst.state_size"),
    (["model.bst.state_size=0"], "model.bst.state_size"),
    (["model.bst.num_context_states=0"], "model.bst.num_context_states"),
    (["model.bst.filter_emb_dim=32"], "model.bst.filter_emb_dim"),
    (["model.bst.filter_hidden=0"], "model.bst.filter_hidden"),
    (["model.bst.filter_sin_freq=0"], "model.bst.filter_sin_freq"),
    (["model.bst.ssm_chunk=0"], "model.bst.ssm_chunk"),
    (["model.bst.ssm_chunk=24"], "model.bst.ssm_chunk"),
    (["model.brect.num_states=0"], "model.brect.num_states"),
    (["model.vocab_size=1000"], "model.vocab_size"),  # below GPT-2's 50257 ids
    (HUGE, "model"),  # parameters and gradients that no device holds
    # data
    (["data.val_fraction=1.0"], "data.val_fraction"),
    (["data.num_shards=0"], "data.num_shards"),
    (["data.prefetch_workers=-1"], "data.prefetch_workers"),
    (["data.prefetch_buffer=0"], "data.prefetch_buffer"),
    (["data.text_field="], "data.text_field"),
    (["data.path="], "data.path"),
    # train
    (["train.steps=0"], "train.steps"),
    (["train.global_batch_size=0"], "train.global_batch_size"),
    (["train.grad_accum=0"], "train.grad_accum"),
    (["train.grad_accum=3"], "train.grad_accum"),
    (["train.seed=-1"], "train.seed"),
    (["train.run_dir="], "train.run_dir"),
    (["train.log_every=0"], "train.log_every"),
    (["train.eval_every=-1"], "train.eval_every"),
    (["train.eval_batches=0"], "train.eval_batches"),
    (["train.max_nan_steps=-1"], "train.max_nan_steps"),
    (["train.loggers=[jsonl, wandb, wandb]"], "train.loggers"),
    (["train.loggers=[tensorboard]"], "train.loggers"),
    (["train.loggers=[jsonl, mlflow]"], "train.loggers[1]"),
    (["train.wandb.tags=[ok, '']"], "train.wandb.tags[1]"),
    (["train.wandb.project="], "train.wandb.project"),
    (["train.wandb.mode=online-ish"], "train.wandb.mode"),
    (["train.profile_steps=[3, 3]"], "train.profile_steps"),
    (["train.profile_steps=[-1, 2]"], "train.profile_steps"),
    (["train.profile_steps=[2, 2000]"], "train.profile_steps"),
    (["train.profile_steps=[2]"], "train.profile_steps"),
    (["train.compile_cache='  '"], "train.compile_cache"),
    (["train.compile_cache=s3://bucket/jax"], "train.compile_cache"),
    (["train.optimizer.lr=0"], "train.optimizer.lr"),
    (["train.optimizer.min_lr_ratio=1.5"], "train.optimizer.min_lr_ratio"),
    (["train.optimizer.warmup_steps=-1"], "train.optimizer.warmup_steps"),
    (["train.optimizer.b1=1.0"], "train.optimizer.b1"),
    (["train.optimizer.b2=-0.5"], "train.optimizer.b2"),
    (["train.optimizer.eps=0"], "train.optimizer.eps"),
    (["train.optimizer.weight_decay=-0.1"], "train.optimizer.weight_decay"),
    (["train.optimizer.clip_norm=-1"], "train.optimizer.clip_norm"),
    # mesh
    (["mesh.data=0"], "mesh.data"),
    (["mesh.fsdp=-2"], "mesh.fsdp"),
    (["mesh.fsdp=-1"], "mesh.fsdp"),  # mesh.data is -1 already
    (["mesh.tensor=3"], "mesh.tensor"),
    (["mesh.rules=[[embedd, fsdp]]"], "mesh.rules[0]"),
    (["mesh.rules=[[embed, fsdpp]]"], "mesh.rules[0]"),
    (["mesh.dcn.fsdp=2"], "mesh.dcn.fsdp"),  # only data may span slices
    (["mesh.dcn={dta: 2}"], "mesh.dcn.dta"),
    (["mesh.dcn.data=0"], "mesh.dcn.data"),
    (["mesh.data=4", "mesh.dcn.data=3"], "mesh.dcn.data"),  # 3 slices cannot split data = 4
    # checkpoint
    (["checkpoint.every=0"], "checkpoint.every"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    (["checkpoint.keep_every=-1"], "checkpoint.keep_every"),
    (["checkpoint.keep_every=150"], "checkpoint.keep_every"),  # every=100: step 150 is never saved
    (["checkpoint.dir="], "checkpoint.dir"),
    # ray
    (["ray.num_workers=0"], "ray.num_workers"),
    (["ray.use_gpu=true", "ray.use_tpu=true"], "ray.use_gpu"),
    (["ray.resources_per_worker={GPU: -1}"], "ray.resources_per_worker.GPU"),
    (["ray.entrypoint_resources={CPU: abc}"], "ray.entrypoint_resources.CPU"),
    (["ray.resources_per_worker={TPU: 4}"], "ray.resources_per_worker.TPU"),
    (["ray.resources_per_worker={GPU: 8}"], "ray.resources_per_worker.GPU"),
    (["ray.use_tpu=true", "ray.num_workers=2"], "ray.topology"),
    # one Ray worker per TPU host of every slice: 2x4x4 is 8 hosts
    (["ray.use_tpu=true", "ray.topology=2x4x4", "ray.accelerator_type=TPU-V5P", "ray.num_workers=4"],
     "ray.num_workers"),
    (["ray.use_tpu=true", "ray.topology=2x4x4", "ray.accelerator_type=TPU-V5P", "ray.num_workers=8",
      "mesh.dcn.data=2"], "ray.num_workers"),
    (["ray.use_tpu=true", "ray.topology=v5p-64", "ray.accelerator_type=TPU-V5P", "ray.num_workers=8"],
     "ray.topology"),
    (["ray.max_failures=-2"], "ray.max_failures"),
    (["ray.cpu_devices_per_worker=-1"], "ray.cpu_devices_per_worker"),
    (["ray.runtime_env={env_vars: [a]}"], "ray.runtime_env.env_vars"),
    (["ray.runtime_env={env_vars: {XLA_PYTHON_CLIENT_MEM_FRACTION: 0.9}}"],
     "ray.runtime_env.env_vars.XLA_PYTHON_CLIENT_MEM_FRACTION"),
    (["ray.address=http://head:8265"], "ray.address"),
    # top level
    (["name="], "name"),
    (["name=a/b"], "name"),
]


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) <= MAX_MESSAGE
    return msg


@pytest.mark.parametrize("overrides,key", OVERRIDES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_bad_value_is_refused_naming_its_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        config.load(TINY, overrides)
    assert _one_line(e).startswith(f"{key}: "), str(e.value)


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh"))

# (file name, bytes written there or None for a folder or nothing) -> what the line says after "PATH: "
FILES = [
    ("empty.yaml", b"", "empty job file"),
    ("comments.yaml", b"# nothing but a comment\n\n", "empty job file"),
    ("binary.yaml", b"model:\n\0\x01\x02", "binary data (a NUL byte at offset 7)"),
    ("latin1.yaml", "description: caf\u00e9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 16)"),
    ("folder.yaml", None, "is a directory"),
    ("missing.yaml", "missing", "no such job file"),
    ("big.yaml", b"# x\n" * (MAX_BYTES // 4 + 1), f"{MAX_BYTES + 4} bytes; a job file is at most"),
    ("dup_top.yaml", b"model: {}\ntrain: {}\nmodel: {}\n", "duplicate key model at lines 1 and 3"),
    ("dup_nested.yaml", b"model:\n  d_model: 128\n  d_model: 256\n", "duplicate key model.d_model at lines 2 and 3"),
    ("laughs.yaml", LAUGHS.encode(), "YAML aliases expand to more than"),
    ("malformed.yaml", b"model:\n  d_model: [1, 2\n", "not valid YAML at line"),
    ("two_docs.yaml", b"model: {}\n---\ntrain: {}\n", "not valid YAML at line"),
    ("list.yaml", b"- just\n- a list\n", "the top level must be a mapping"),
    ("include_missing.yaml", b"include: nowhere.yaml\n", "include 'nowhere.yaml': no such file"),
    ("include_self.yaml", b"include: include_self.yaml\n", "include cycle"),
]


@pytest.mark.parametrize("name,content,says", FILES, ids=[f[0] for f in FILES])
def test_a_bad_file_is_refused_naming_the_file(tmp_path, name, content, says):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    msg = _one_line(e)
    assert msg.startswith(f"{path}: ") and says in msg, msg


def test_sibling_includes_that_disagree_name_the_key_and_both_files(tmp_path):
    (tmp_path / "x.yaml").write_text("train: {steps: 10}\n")
    (tmp_path / "y.yaml").write_text("train: {steps: 20}\n")
    (tmp_path / "job.yaml").write_text("include: [x.yaml, y.yaml]\n")
    with pytest.raises(ConfigError) as e:
        config.load(tmp_path / "job.yaml")
    assert _one_line(e) == (f"{tmp_path}/job.yaml: its includes x.yaml and y.yaml set train.steps differently "
                            f"(10 and 20); set train.steps in {tmp_path}/job.yaml")


def test_what_the_rules_allow_still_loads(tmp_path):
    """The edges of the ranges, aliases used a few times, and `1e-4` as a number."""
    cfg = config.load(TINY, ["model.dropout=0", "data.val_fraction=0", "train.optimizer.min_lr_ratio=1",
                             "train.optimizer.clip_norm=0", "mesh.data=2", "mesh.fsdp=-1", "checkpoint.keep_every=300",
                             "ray.runtime_env={env_vars: {A: '0.9'}}", "mesh.rules=[[embed, null]]"])
    assert cfg.mesh.fsdp == -1 and cfg.checkpoint.keep_every == 300
    path = tmp_path / "anchors.yaml"
    path.write_text("checkpoint: {every: &n 50, keep_every: *n}\ntrain: {optimizer: {lr: 1e-4}, steps: *n}\n")
    cfg = config.load(path)
    assert (cfg.checkpoint.keep_every, cfg.train.steps, cfg.train.optimizer.lr) == (50, 50, 1e-4)


def test_the_axis_names_match_the_parallel_package():
    from bst_dist.config.validate import LOGICAL_AXES, mesh_axes
    from bst_dist.parallel.mesh import AXES
    from bst_dist.parallel.rules import DEFAULT_RULES

    assert set(LOGICAL_AXES) == set(DEFAULT_RULES) and set(mesh_axes()) == set(AXES)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "bst_dist", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": REPO})


def test_cli_duplicate_key_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "job.yaml").write_text("model:\n  d_model: 128\n  d_model: 256\n")
    r = _cli("describe", "--resolved", "job.yaml", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("bst-dist describe: error: job.yaml: duplicate key model.d_model at lines 2 and 3; "
                        "a key may appear once per mapping\n")


def test_cli_train_refuses_before_it_writes(tmp_path):
    r = _cli("train", TINY, "--set", "train.run_dir=run", "--set", "train.optimizer.b2=1.5", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == "bst-dist train: error: train.optimizer.b2: must be in [0, 1), got 1.5\n"
    assert os.listdir(tmp_path) == []  # no run folder, no checkpoint, no Ray session files

"""Job specs: strict, typed, validated once; every mistake is one line naming the key."""

import os
import subprocess
import sys

import pytest

from bst_dist import config
from bst_dist.config import ConfigError

from tests.helpers.paths import LOCAL_TINY as TINY, REPO



def test_local_tiny_loads_with_types():
    cfg = config.load(TINY)
    assert cfg.name == "local_tiny" and cfg.model.seq_len % cfg.model.block_len == 0
    assert cfg.model.bst_layers == (1,) and isinstance(cfg.model.bst_layers, tuple)
    assert cfg.model.padded_vocab == 50304  # GPT-2's 50257 padded to a multiple of 128
    assert cfg.model.layer_kind(1) == "bst" and cfg.model.layer_kind(0) == "block"


@pytest.mark.parametrize("override,message", [
    ("model.d_modl=3", r"^model\.d_modl: unknown key; did you mean 'd_model'\?$"),
    ("train.stpes=3", r"^train\.stpes: unknown key; did you mean 'steps'\?$"),
    ("model.seq_len=100", r"^model\.seq_len: L=100 must be a multiple of model\.block_len W=64$"),
    ("model.bst_layers=[4]", r"^model\.bst_layers: layer index 4 out of range; allowed 0\.\.3 \(0-based\)$"),
    ("model.num_heads=3", r"^model\.head_dim: num_heads x head_dim = 3x32 = 96 must equal model\.d_model=128$"),
    ("model.dtype=fp8", r"^model\.dtype: 'fp8' is not allowed; allowed: float32, bfloat16$"),
    ("model.bst.variant=XX", r"^model\.bst\.variant: 'XX' is not allowed; allowed: SH, MH, MF$"),
    ("train.steps=abc", r"^train\.steps: expected an integer, got 'abc'$"),
    ("train.steps=1.5", r"^train\.steps: expected an integer, got 1\.5$"),
    ("model.xl_cache=maybe", r"^model\.xl_cache: expected true or false, got 'maybe'$"),
    ("model.brect_layers=[1]", r"^model\.bst_layers: layer 1 is also in model\.brect_layers; a layer has one kind$"),
    ("mesh.tensor=3", r"^mesh\.tensor: 3 must divide model\.num_heads=4$"),
    ("train.grad_accum=3", r"^train\.grad_accum: 3 must divide train\.global_batch_size=8$"),
    ("mesh.data=-1", None),  # allowed: fill with the remaining devices
    ("model.bst.state_size=15", r"^model\.bst\.state_size: must be even"),
    ("train", r"^--set train: expected KEY=VALUE"),
])
def test_bad_values_are_one_line_errors(override, message):
    if message is None:
        config.load(TINY, [override])
        return
    with pytest.raises(ConfigError, match=message) as e:
        config.load(TINY, [override])
    assert "\n" not in str(e.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML at line \d+, column \d+"):
        config.load(str(bad))
    top = tmp_path / "top.yaml"
    top.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config.load(str(top))
    with pytest.raises(ConfigError, match="no such job file"):
        config.load(str(tmp_path / "missing.yaml"))


def test_overrides_create_nested_keys_and_keep_types():
    cfg = config.load(TINY, ["model.bst.variant=MF", "train.optimizer.lr=0.01", "model.bst_layers=[0,2]"])
    assert cfg.model.bst.variant == "MF" and cfg.train.optimizer.lr == 0.01 and cfg.model.bst_layers == (0, 2)
    # the resolved spec round-trips through plain data
    assert config.from_dict(config.to_dict(cfg)) == cfg


def test_cli_prints_one_line_and_exits_2():
    r = subprocess.run([sys.executable, "-m", "bst_dist", "describe", TINY, "--set", "model.num_layrs=2"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip() == "bst-dist describe: error: model.num_layrs: unknown key; did you mean 'num_layers'?"


def test_describe_counts_parameters_without_building():
    from bst_dist.runs.describe import describe

    d = describe(config.load(TINY))
    kinds = [layer["kind"] for layer in d["layers"]]
    assert kinds == ["Block", "BST:SH:S4", "Block", "Block"]
    p = d["params"]
    assert p["embedding"] == 50304 * 128 and p["total"] == p["embedding"] + p["non_embedding"]
    assert p["total"] == sum(layer["params"] for layer in d["layers"]) + p["embedding"] + 128  # + final norm


@pytest.mark.parametrize("text,want", [("1e-4", 1e-4), ("3e-4", 3e-4), ("1.0e6", 1.0e6), ("2E+3", 2e3)])
def test_exponent_notation_reads_as_a_float_in_files_and_overrides(tmp_path, text, want):
    with open(TINY) as f:
        job = f.read().replace("lr: 3.0e-3", f"lr: {text}")
    path = tmp_path / "job.yaml"
    path.write_text(job)
    assert config.load(str(path)).train.optimizer.lr == want
    assert config.load(TINY, [f"train.optimizer.lr={text}"]).train.optimizer.lr == want

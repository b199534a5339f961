"""`include:` in job files: a file overrides what it includes; sections merge key by key, other
values are replaced whole; sibling includes that disagree are an error unless the including file
decides or one of them includes the other; cycles and missing files are one-line errors."""

import pytest

from bst_dist import config
from bst_dist.config import ConfigError


def _write(tmp_path, files: dict) -> None:
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_a_file_overrides_what_it_includes_and_sections_merge_key_by_key(tmp_path):
    _write(tmp_path, {
        "base/a.yaml": "model: {d_model: 256, num_heads: 4, head_dim: 64}\n"
                       "ray: {runtime_env: {env_vars: {A: '1', B: '2'}}}\n",
        "job.yaml": "include: base/a.yaml\nmodel: {d_model: 128, head_dim: 32}\n"
                    "ray: {runtime_env: {env_vars: {C: '3'}}}\n",
    })
    cfg = config.load(tmp_path / "job.yaml")
    assert (cfg.model.d_model, cfg.model.num_heads, cfg.model.head_dim) == (128, 4, 32)
    assert cfg.ray.runtime_env == {"env_vars": {"C": "3"}}  # a mapping value is replaced whole
    assert cfg.name == "job"  # from the file that was loaded, not the included one


def test_includes_resolve_relative_to_the_including_file(tmp_path, monkeypatch):
    _write(tmp_path, {"a/b/base.yaml": "train: {steps: 7}\n", "a/job.yaml": "include: [b/base.yaml]\n"})
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert config.load("../job.yaml").train.steps == 7


def test_sibling_includes_that_disagree_are_an_error_unless_the_including_file_decides(tmp_path):
    _write(tmp_path, {
        "x.yaml": "train: {steps: 10, seed: 1}\n",
        "y.yaml": "train: {steps: 20, seed: 1}\n",
        "job.yaml": "include: [x.yaml, y.yaml]\n",
        "decided.yaml": "include: [x.yaml, y.yaml]\ntrain: {steps: 30}\n",
    })
    with pytest.raises(ConfigError) as e:
        config.load(tmp_path / "job.yaml")
    msg = str(e.value)
    assert "train.steps" in msg and "x.yaml" in msg and "y.yaml" in msg and "10" in msg and "20" in msg
    assert "seed" not in msg and "\n" not in msg  # the same value twice is no conflict
    assert config.load(tmp_path / "decided.yaml").train.steps == 30


def test_a_sibling_that_includes_the_other_source_overrides_it(tmp_path):
    """The job/variant shape: the GPU job and the TPU delta both include the base; the TPU delta's
    own keys override the base's wherever the base arrives, the job's own keys override the base's."""
    _write(tmp_path, {
        "base.yaml": "train: {steps: 10, seed: 1}\nray: {use_gpu: true}\n",
        "gpu.yaml": "include: base.yaml\ntrain: {seed: 5}\n",
        "tpu.yaml": "include: base.yaml\nray: {use_gpu: false, use_tpu: true}\n",
        "variant.yaml": "include: [gpu.yaml, tpu.yaml]\n",
    })
    cfg = config.load(tmp_path / "variant.yaml")
    assert (cfg.train.steps, cfg.train.seed, cfg.ray.use_gpu, cfg.ray.use_tpu) == (10, 5, False, True)


def test_include_cycles_and_missing_includes_are_one_line_errors_naming_the_files(tmp_path):
    _write(tmp_path, {"a.yaml": "include: b.yaml\n", "b.yaml": "include: [c.yaml, a.yaml]\n", "c.yaml": "{}\n",
                      "m.yaml": "include: nowhere.yaml\n", "bad.yaml": "include: {x: 1}\n"})
    with pytest.raises(ConfigError, match=r"a\.yaml: include cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml$"):
        config.load(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match=r"m\.yaml: include 'nowhere\.yaml': no such file .*nowhere\.yaml$"):
        config.load(tmp_path / "m.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: include: expected a path or a list of paths"):
        config.load(tmp_path / "bad.yaml")


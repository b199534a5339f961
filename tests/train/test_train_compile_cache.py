"""train.compile_cache: JAX's persistent compilation cache. A second process with the same job
loads every program the first compiled (the train step included) and writes nothing new; each
test points the key at its own folder so no two tests share a cache."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from tests.helpers.runs import train_subprocess
from tests.helpers.tiny import write_job


@pytest.fixture
def restore_cache_setting():
    import jax

    from bst_dist.train import compile_cache

    before = jax.config.jax_compilation_cache_dir
    yield
    compile_cache.enable(before if before is not None else "")


def test_default_folder_and_off(monkeypatch):
    from bst_dist.train.compile_cache import cache_dir

    assert cache_dir("") is None
    assert cache_dir(None) is None  # the suite's BST_DIST_COMPILE_CACHE="" (tests/conftest.py)
    monkeypatch.setenv("BST_DIST_COMPILE_CACHE", "/tmp/elsewhere/jax")
    assert cache_dir(None) == "/tmp/elsewhere/jax"
    monkeypatch.delenv("BST_DIST_COMPILE_CACHE")
    assert cache_dir(None) == os.path.join(os.path.expanduser(os.environ["BST_DIST_CACHE"]), "jax")
    assert cache_dir("gs://b/jax") == "gs://b/jax"
    assert os.path.isabs(cache_dir("rel/jax"))


def test_a_compile_is_written_and_switching_folders_takes_effect(tmp_path, restore_cache_setting):
    import jax

    from bst_dist.train import compile_cache

    salt = float(np.random.default_rng().integers(1 << 30))  # a program no earlier test compiled
    for name in ("a", "b"):  # the second folder is used although the process already compiled
        folder = tmp_path / name
        assert compile_cache.enable(str(folder)) == str(folder)
        jax.jit(lambda x: x * salt + len(name))(np.arange(3.0)).block_until_ready()
        assert [f for f in os.listdir(folder) if f.startswith("jit_")], f"nothing cached in {folder}"
    compile_cache.enable("")
    assert jax.config.jax_compilation_cache_dir is None


def _run(job: str, run_dir: str, cache: str) -> str:
    p = train_subprocess(job, run_dir, "--set", f"train.compile_cache={cache}")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


@pytest.mark.slow
def test_a_resume_loads_the_step_from_the_cache_a_fresh_run_wrote(tmp_path):
    job = write_job(tmp_path / "job.yaml", train={"steps": 4}, checkpoint={"every": 2, "keep_last": 3})
    cache = str(tmp_path / "jax_cache")
    _run(job, str(tmp_path / "first"), cache)
    written = set(os.listdir(cache))
    assert any(f.startswith("jit_train_step-") for f in written), sorted(written)
    assert any(f.startswith("jit_init-") for f in written), sorted(written)
    # A restart of the first run from its step 2 (a copy, as if it had been killed there):
    os.makedirs(tmp_path / "resumed" / "checkpoints")
    shutil.copytree(tmp_path / "first" / "checkpoints" / "2", tmp_path / "resumed" / "checkpoints" / "2")
    out = _run(job, str(tmp_path / "resumed"), cache)
    assert "resumed from" in out, out
    new = set(os.listdir(cache)) - written
    assert not new, f"the resume compiled programs the first run had cached: {sorted(new)}"

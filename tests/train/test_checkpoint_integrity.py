"""Damaged checkpoints are never restored silently: each step carries a manifest of per-file
sha256 written after the step completed; a flipped byte, a truncation or a deleted item falls
back to the previous verified step with one warning line, and a format-1 step (written before
manifests) restores with one warning."""

import logging
import os
import random
import shutil
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bst_dist.train import integrity
from bst_dist.train.checkpoint import (FORMAT_VERSION, Checkpointer, CheckpointWriteError, IncompatibleCheckpoint,
                                       check_compatible, format_version)

from tests.helpers.paths import FIXTURES
from tests.helpers.runs import tmpfs

FIXTURE = os.path.join(FIXTURES, "checkpoint_format1")


def _it(n):
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    for _ in range(n):
        next(it)
    return it


def _write(directory, steps=(1, 2), cache=True):
    ck = Checkpointer(directory, every=1, keep_last=10)
    it = _it(0)
    for s in steps:
        next(it)
        c = {"c": jnp.full((4,), float(s))} if cache else {}
        ck.save(s, state={"w": jnp.full((8, 4), float(s))}, cache=c, data_iter=it, meta={"tokens_seen": s})
    ck.close()


def _restore(directory, caplog, cache=True, shape=(8, 4)):
    ck = Checkpointer(directory, every=1, keep_last=10)
    abs_c = {"c": jax.ShapeDtypeStruct((4,), jnp.float32)} if cache else {}
    with caplog.at_level(logging.WARNING, logger="bst_dist.train.checkpoint"):
        state, c, meta, step = ck.restore(abstract_state={"w": jax.ShapeDtypeStruct(shape, jnp.float32)},
                                          abstract_cache=abs_c, data_iter=_it(0))
    ck.close()
    return np.asarray(state["w"]), step


def _files(step_dir, item):
    out = []
    for root, _, names in os.walk(os.path.join(step_dir, item)):
        out += [os.path.join(root, n) for n in names if os.path.getsize(os.path.join(root, n)) > 0]
    return sorted(out)


def _check_fallback(directory, caplog, cause_part):
    w, step = _restore(directory, caplog)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert step == 1 and np.all(w == 1.0), (step, warnings)
    assert len(warnings) == 1 and "checkpoint step 2 is unreadable (" in warnings[0], warnings
    assert "falling back to step 1" in warnings[0] and cause_part in warnings[0], warnings


@pytest.mark.parametrize("item", ["state", "cache", "data", "meta"])
def test_a_flipped_byte_in_any_item_falls_back(tmp_path, caplog, item):
    d = str(tmp_path / "ck")
    _write(d)
    path = _files(os.path.join(d, "2"), item)[-1]
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    _check_fallback(d, caplog, "does not match its checksum")


def test_truncation_deletion_and_missing_manifest_fall_back(tmp_path, caplog):
    d = str(tmp_path / "ck")
    _write(d)
    keep = str(tmp_path / "keep")
    shutil.copytree(d, keep)
    path = _files(os.path.join(d, "2"), "state")[0]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    _check_fallback(d, caplog, "truncated")
    for what, cause in [("cache", "item cache missing"), (integrity.MANIFEST, "no integrity.json")]:
        caplog.clear()
        shutil.rmtree(d)
        shutil.copytree(keep, d)
        target = os.path.join(d, "2", what)
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        _check_fallback(d, caplog, cause)


def test_retention_never_deletes_the_last_verified_step(tmp_path):
    d = str(tmp_path / "ck")
    _write(d, steps=(1, 2, 3))
    os.remove(os.path.join(d, "3", integrity.MANIFEST))  # step 3 is now unverified
    ck = Checkpointer(d, every=1, keep_last=1)
    ck.restore(abstract_state={"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)},
               abstract_cache={"c": jax.ShapeDtypeStruct((4,), jnp.float32)}, data_iter=_it(0))
    assert ck.last_verified_step == 2
    ck.close()
    assert 2 in Checkpointer(d, every=1, keep_last=1).all_steps()


def test_format1_checkpoint_restores_with_one_warning(tmp_path, caplog):
    d = str(tmp_path / "ck")
    shutil.copytree(FIXTURE, d)
    w, step = _restore(d, caplog, cache=False, shape=(2, 4))
    assert step == 3 and np.array_equal(w, np.arange(8.0).reshape(2, 4))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "format 1" in warnings[0] and f"format {FORMAT_VERSION}" in warnings[0]


def test_a_newer_format_is_refused_in_one_line():
    meta = {"step": 7, "format_version": FORMAT_VERSION + 1, "config": {}}
    with pytest.raises(IncompatibleCheckpoint) as e:
        check_compatible(meta, {"model": {}}, source="runs/x/checkpoints")
    assert str(e.value) == (f"checkpoint runs/x/checkpoints step 7 has format version {FORMAT_VERSION + 1}; "
                            f"this bst_dist reads up to {FORMAT_VERSION}: upgrade it")
    assert format_version({"schema_version": 1}) == 1 and format_version({"format_version": 2}) == 2


def test_unwritable_location_is_found_by_the_probe(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ck = Checkpointer(str(tmp_path / "ok"), every=1, keep_last=1)
    ck.check_writable()
    ck.close()
    with pytest.raises(CheckpointWriteError, match="checkpoint.dir .* (cannot be opened|is not writable)"):
        Checkpointer(str(blocker / "ck"), every=1, keep_last=1).check_writable()


def test_a_save_that_fails_on_a_full_disk_is_reported_at_the_next_save(tmp_path, caplog):
    big = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((512, 1024), dtype=np.float32))}  # 2 MiB
    with tmpfs(tmp_path / "full", "1m") as d:
        ck = Checkpointer(d, every=1, keep_last=5)
        ck.check_writable()
        it = _it(1)
        ck.save(1, state={"w": jnp.ones((8, 4))}, cache={}, data_iter=it, meta={})
        ck.wait()
        assert ck.last_verified_step == 1
        ck.save(2, state=big, cache={}, data_iter=it, meta={})  # async: fails in the background
        with pytest.raises(CheckpointWriteError) as e:
            for step in range(3, 50):  # the loop calls save every step; it must not go on for long
                time.sleep(0.1)
                ck.save(step, state={"w": jnp.ones((8, 4))}, cache={}, data_iter=it, meta={})
        assert str(e.value) == (f"checkpoint step 2 could not be written to {d} (No space left on device); "
                                "the run stops; the last good checkpoint is step 1"), str(e.value)
        ck.close()
        ck = Checkpointer(d, every=1, keep_last=5)
        assert ck.all_steps() == [1]
        ck.close()


WRITER = """
import sys, time
import grain, jax.numpy as jnp, numpy as np
from bst_dist.train.checkpoint import Checkpointer
ck = Checkpointer(sys.argv[1], every=1, keep_last=10)
it = iter(grain.MapDataset.range(100).to_iter_dataset())
for step in (1, 2):
    w = jnp.asarray(np.full((1024, 1024), float(step), np.float32))  # 4 MiB: the write takes a while
    ck.save(step, state={"w": w}, cache={"c": jnp.full((4,), float(step))}, data_iter=it, meta={})
    if step == 1:
        ck.wait()
        print("saved 1", flush=True)
print("saving 2", flush=True)
ck.wait()
print("saved 2", flush=True)
time.sleep(60)
"""


def _kill_during_the_second_save(d, delay):
    import signal
    import subprocess
    import sys

    from tests.helpers.paths import REPO

    p = subprocess.Popen([sys.executable, "-c", WRITER, d], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    assert p.stdout.readline().strip() == "saved 1"
    assert p.stdout.readline().strip() == "saving 2"
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()


@pytest.mark.parametrize("delay", [0.0, *(pytest.param(t, marks=pytest.mark.slow) for t in (0.05, 0.2, 1.0))])
def test_sigkill_during_a_save_restores_a_whole_verified_step(tmp_path, caplog, delay):
    d = str(tmp_path / "ck")
    _kill_during_the_second_save(d, delay)
    ck = Checkpointer(d, every=1, keep_last=10)
    with caplog.at_level(logging.WARNING, logger="bst_dist.train.checkpoint"):
        state, cache, _, step = ck.restore(abstract_state={"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)},
                                           abstract_cache={"c": jax.ShapeDtypeStruct((4,), jnp.float32)},
                                           data_iter=_it(0))
    ck.close()
    assert step in (1, 2)
    assert np.all(np.asarray(state["w"]) == step) and np.all(np.asarray(cache["c"]) == step)  # never a mix
    assert os.path.exists(os.path.join(d, str(step), integrity.MANIFEST))


@pytest.mark.slow
def test_twenty_random_corruptions_are_never_restored_silently(tmp_path, caplog):
    d = str(tmp_path / "ck")
    _write(d)
    keep = str(tmp_path / "keep")
    shutil.copytree(d, keep)
    rng = random.Random(0)
    for _ in range(20):
        caplog.clear()
        shutil.rmtree(d)
        shutil.copytree(keep, d)
        path = rng.choice([p for item in ("state", "cache", "data", "meta") for p in _files(os.path.join(d, "2"), item)])
        data = bytearray(open(path, "rb").read())
        n = rng.randint(1, min(4096, len(data)))
        at = rng.randint(0, len(data) - n)
        new = bytes(rng.getrandbits(8) for _ in range(n))
        if new == bytes(data[at:at + n]):
            continue
        data[at:at + n] = new
        open(path, "wb").write(bytes(data))
        w, step = _restore(d, caplog)
        assert step == 1 and np.all(w == 1.0)

"""The restore side of the checkpoints (`train/checkpoint.py` saves and lists): the integrity
manifest of a written step, the check of a step against it before a restore, the fallback from
an unreadable step to the one before, and which checkpoints a job may continue from.

A step is verified when its manifest (bst_dist.train.integrity) matches: process 0 hashes a
finished save on a thread and checks a step before it is read; the other processes follow its
answer (a collective), so every process restores the same step or falls back together.

Format versions (meta "format_version"): 1, written before integrity manifests (its meta has
"schema_version": 1), restores unverified with one warning and is replaced by format 2 at the
next save; 2, the current one. A newer version than this code knows is refused in one line.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from bst_dist.errors import UserError
from bst_dist.train import integrity
from bst_dist.train.preemption import any_process
from data_pipelines.checkpoint import LaneRestore

log = logging.getLogger("bst_dist.train.checkpoint")  # one logger for the checkpoints, both halves

# Bump when the layout of `state`, `cache`, `data` or `meta` changes; say in `_migrate` how an
# older step is read (or refused with the way to convert it).
FORMAT_VERSION = 2

# Model keys that may change between a checkpoint and the job that resumes it: they change
# neither a parameter shape nor the cache layout.
# keys that change numerics or kernels but no parameter or cache shape: a resume may change them
_FREE_MODEL_KEYS = frozenset({"dtype", "dropout", "attn_dropout", "mask", "attention_impl"})


class IncompatibleCheckpoint(UserError, ValueError):
    """A checkpoint whose model shape, L, W or global batch differ from the job's."""


class NoReadableCheckpoint(UserError, RuntimeError):
    """Every candidate checkpoint failed to restore."""


def format_version(meta: dict) -> int:
    """The checkpoint format of a step's meta: steps written before format versions carry
    "schema_version": 1 and no integrity manifest (format 1)."""
    return int(meta.get("format_version", 1))


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _from_primary(code: int) -> int:
    """Process 0's `code`, on every process (a collective with several processes)."""
    if jax.process_count() == 1:
        return code
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(code, dtype=np.int32)))


def _has_leaves(tree: Any) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def abstract_tree(tree: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
    """ShapeDtypeStructs with shardings for `restore`, from arrays or abstract values.

    With `mesh`, every NamedSharding is rebuilt on it with the same PartitionSpec (this maps the
    AbstractMesh shardings of `nnx.eval_shape`, which Orbax rejects, and moves a tree onto another
    mesh); leaves without a NamedSharding are replicated on `mesh`.
    """

    def one(x):
        sharding = getattr(x, "sharding", None)
        if mesh is not None:
            spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
            sharding = NamedSharding(mesh, spec)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def _flatten(d: Any, prefix: str) -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    if isinstance(d, tuple):
        d = list(d)
    return {prefix: d}


def check_compatible(meta: dict, job_cfg_dict: dict, *, source: str | None = None) -> None:
    """Refuse a checkpoint the job cannot continue from.

    Compares the model section (every key except dtype, dropout, attn_dropout and mask: these
    change no shape), which includes L (`model.seq_len`) and W (`model.block_len`), and
    `train.global_batch_size` (one lane per batch row: the cache and data positions are per lane).
    Keys absent from the checkpoint's config (written by older code) are not compared. Raises
    IncompatibleCheckpoint with one line naming the first difference.
    """
    where = f"checkpoint {source} step {meta.get('step')}" if source else f"checkpoint step {meta.get('step')}"
    version = format_version(meta)
    if version > FORMAT_VERSION:
        raise IncompatibleCheckpoint(
            f"{where} has format version {version}; this bst_dist reads up to {FORMAT_VERSION}: upgrade it")
    saved_cfg = meta.get("config") or {}
    saved = _flatten(saved_cfg.get("model", {}), "model")
    wanted = _flatten(job_cfg_dict.get("model", {}), "model")
    saved["train.global_batch_size"] = (saved_cfg.get("train") or {}).get("global_batch_size")
    wanted["train.global_batch_size"] = (job_cfg_dict.get("train") or {}).get("global_batch_size")
    for key, want in wanted.items():
        if key.split(".")[1] in _FREE_MODEL_KEYS or saved.get(key) is None:
            continue
        if saved[key] != want:
            raise IncompatibleCheckpoint(f"{where} has {key}={saved[key]}, the job has {want}")


class Restorer:
    """The restore half of `Checkpointer` (its base class): uses its Orbax manager `_mngr`,
    `directory`, `step_dir`, `_primary`, `_write_error` and the bookkeeping sets `_checked`
    (steps that matched their manifest) and `_known` (steps this process wrote or restored)."""

    def _start_manifest(self, step: int) -> None:
        """Process 0 hashes the written `step` into its manifest on a thread (hashing a large
        state takes seconds the loop need not wait for); `_finish_manifest` collects it."""
        errors: list[BaseException] = []
        thread = None
        if self._primary:
            def write():
                try:
                    integrity.write_manifest(self.step_dir(step))
                except BaseException as e:  # noqa: BLE001 - reported by _finish_manifest
                    errors.append(e)

            thread = threading.Thread(target=write, name=f"bst-dist-manifest-{step}", daemon=True)
            thread.start()
        self._hashing = (step, thread, errors)

    def _finish_manifest(self, *, block: bool) -> bool:
        """The manifest of the last written step: done (then that step is the last verified one),
        failed (CheckpointWriteError on every process), or, with block=False, still being written
        (returns False). Every process learns process 0's answer (a collective)."""
        if self._hashing is None:
            return True
        step, thread, errors = self._hashing
        if block and thread is not None:
            thread.join()
        code = 1 if thread is not None and thread.is_alive() else 2 if errors else 0
        code = _from_primary(code)
        if code == 1:
            return False
        self._hashing = None
        if code == 2:
            error = errors[0] if errors else RuntimeError("process 0 failed")
            raise self._write_error(f"checkpoint step {step}: its integrity manifest could not be written "
                                    f"to {self.directory}", error) from None
        self.last_verified_step = step
        return True

    def _candidates(self, step: int | None) -> list[int]:
        if step is not None:
            if step not in self._mngr.all_steps():
                raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step} "
                                        f"(have {self.all_steps() or 'none'})")
            return [step]
        steps = sorted(self._mngr.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint")
        return steps

    def _verify(self, step: int) -> None:
        """Raise integrity.CorruptStep unless `step` matches its manifest (every process agrees:
        the primary checks, the others follow it). A format-1 step has no manifest: it restores
        unverified, with one warning."""
        if step in self._checked:
            return
        error = None
        if self._primary and integrity.has_manifest(self.step_dir(step)):
            try:
                integrity.verify(self.step_dir(step))
            except integrity.CorruptStep as e:
                error = e
            except OSError as e:
                error = integrity.CorruptStep(f"cannot be read ({e.strerror or _first_line(e)})")
        has = integrity.has_manifest(self.step_dir(step))
        if any_process(error is not None):
            raise error or integrity.CorruptStep("another process found it damaged")
        if not has:
            meta = self._read_meta(step)
            version = format_version(meta)
            if version >= 2:
                # Orbax lists only committed steps, so this one is complete: the run stopped before
                # hashing it. An older verified step is preferred; with none, this is the work there is.
                older = [s for s in self._mngr.all_steps() if s < step and integrity.has_manifest(self.step_dir(s))]
                if older:
                    raise integrity.CorruptStep(f"no {integrity.MANIFEST} (the save did not finish)")
                log.warning("checkpoint step %d has no %s (the run stopped before hashing it) and no older "
                            "verified step exists: restoring it unverified", step, integrity.MANIFEST)
                self._checked.add(step)
                return
            log.warning("checkpoint step %d was written by an older bst_dist (format %d, no checksums): "
                        "restoring it unverified; the next save writes format %d", step, version, FORMAT_VERSION)
        self._checked.add(step)

    def _with_fallback(self, step: int | None, attempt):
        """Run attempt(s) for the newest step, falling back to older ones when it fails.

        Processes agree on failure (any_process), so all of them fall back together.
        """
        candidates = self._candidates(step)
        for i, s in enumerate(candidates):
            error = None
            try:
                result = attempt(s)
            except IncompatibleCheckpoint:
                raise
            except Exception as e:  # noqa: BLE001 - any read error makes the step unreadable
                log.debug("checkpoint step %d failed to restore", s, exc_info=True)
                error = e
            if not any_process(error is not None):
                return result
            reason = _first_line(error) if error is not None else "another process failed to read it"
            if step is not None:
                raise NoReadableCheckpoint(
                    f"checkpoint {self.directory} step {s} is unreadable ({reason})") from None
            if i + 1 < len(candidates):
                log.warning("checkpoint step %d is unreadable (%s); falling back to step %d",
                            s, reason, candidates[i + 1])
            else:
                log.warning("checkpoint step %d is unreadable (%s); no older checkpoint", s, reason)
                raise NoReadableCheckpoint(
                    f"{self.directory}: no readable checkpoint (tried steps "
                    f"{', '.join(map(str, candidates))})") from None
        raise AssertionError("unreachable")

    def read_meta(self, step: int | None = None) -> dict:
        """The `meta` JSON of `step` (None: the newest verified one), migrated to this format."""

        def attempt(s: int) -> dict:
            self._verify(s)
            return self._read_meta(s)

        return self._with_fallback(step, attempt)

    def _read_meta(self, step: int) -> dict:
        return dict(self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, *, abstract_state: Any, abstract_cache: Any, data_iter: Any,
                step: int | None = None, job_config: dict | None = None):
        """Restore (state, cache, meta, step); `data_iter` is repositioned in place.

        `abstract_*` are pytrees of jax.ShapeDtypeStruct whose `sharding` is a NamedSharding on
        the real mesh of this run (see `abstract_tree`): arrays are read and resharded onto it,
        whatever mesh wrote them. step=None: the newest step that verifies and restores,
        falling back past damaged ones. With `job_config` (the resolved job as a dict) each
        candidate's meta is checked first with `check_compatible`, so a changed model is
        reported as such rather than as an unreadable checkpoint.
        """

        def attempt(s: int):
            self._verify(s)
            if job_config is not None:
                check_compatible(self._read_meta(s), job_config, source=self.directory)
            items = {
                "state": ocp.args.StandardRestore(abstract_state),
                "data": LaneRestore(data_iter),
                "meta": ocp.args.JsonRestore(),
            }
            want_cache = _has_leaves(abstract_cache)
            if want_cache:
                if not (self.step_dir(s) / "cache").exists():
                    raise IncompatibleCheckpoint(
                        f"checkpoint {self.directory} step {s} has no cache; the job's model carries one")
                items["cache"] = ocp.args.StandardRestore(abstract_cache)
            out = self._mngr.restore(s, args=ocp.args.Composite(**items))
            cache = out["cache"] if want_cache else abstract_cache
            return out["state"], cache, dict(out["meta"]), s

        result = self._with_fallback(step, attempt)
        self._known.add(result[3])
        self.last_verified_step = result[3]
        return result

    def restore_state(self, *, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """(state, meta, step) alone, for evaluation and inspection (no data position, no cache).
        `abstract_state` may be a part of the saved state ({"params": ...}): only that is read."""

        def attempt(s: int):
            self._verify(s)
            # Orbax's StandardRestore(strict=False) still refuses a restore item with fewer
            # subtrees than were saved; a PyTree restore with partial_restore reads only those
            # asked for, so the optimizer state is never read or allocated.
            item = abstract_state
            args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                          partial_restore=True)
            with ocp.PyTreeCheckpointer() as reader:
                state = reader.restore(os.path.join(str(self.directory), str(s), "state"), args=args)
            meta = self._mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            return state, dict(meta), s

        return self._with_fallback(step, attempt)

"""Orbax checkpoints that hold everything an exact resume needs.

One step directory holds four items:

* `state`: the sharded train state (params, optimizer state, step), any jax pytree
  (nnx.State, optax NamedTuples and dicts included);
* `cache`: the sharded cross-sequence cache; not written when it has no leaves (Orbax refuses
  empty items), and then restored as the empty tree the caller passes;
* `data`: the Grain iterator position, through Grain's own Orbax handler
  (data_pipelines.checkpoint LaneSave/LaneRestore): one `process_<i>-of-<n>.json` per process,
  each holding every lane, so any process count restores it;
* `meta`: JSON: the caller's dict (the resolved job config under "config", "tokens_seen", ...)
  plus "step", "schema_version" and "code_version".

Orbax writes a step into a temporary directory and renames it when every item is complete, so a
half-written step (a kill during an async save) is never listed, never restored, and cleaned up
on the next start. A step whose files are damaged later (truncated copy, bad disk) is detected
at restore: `restore(step=None)` logs "checkpoint step N is unreadable (...); falling back to
step M" and tries the previous one.

Multi-process: every JAX process must construct the Checkpointer and call `save`, `restore`,
`read_meta`, `wait` and `close` in the same order with the same steps: Orbax saves and restores
are collectives (each process writes and reads its own shards, with barriers between). Works
with a local path, NFS, or `gs://bucket/...` (Orbax goes through etils epath).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

import bst_dist
from bst_dist.errors import UserError
from bst_dist.train.preemption import any_process
from data_pipelines.checkpoint import LaneRestore, LaneSave

log = logging.getLogger(__name__)

# Bump when the layout of `state`, `cache`, `data` or `meta` changes incompatibly.
SCHEMA_VERSION = 1

# Model keys that may change between a checkpoint and the job that resumes it: they change
# neither a parameter shape nor the cache layout.
# keys that change numerics or kernels but no parameter or cache shape: a resume may change them
_FREE_MODEL_KEYS = frozenset({"dtype", "dropout", "attn_dropout", "mask", "attention_impl"})

_ITEMS = ("state", "cache", "data", "meta")


class IncompatibleCheckpoint(UserError, ValueError):
    """A checkpoint whose model shape, L, W or global batch differ from the job's."""


class NoReadableCheckpoint(UserError, RuntimeError):
    """Every candidate checkpoint failed to restore."""


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    version = meta.get("schema_version", SCHEMA_VERSION)
    if version > SCHEMA_VERSION:
        raise IncompatibleCheckpoint(
            f"{where} has schema version {version}; this bst_dist reads up to {SCHEMA_VERSION}: upgrade it")
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


class Checkpointer:
    """`ocp.CheckpointManager` with the items `state`, `cache`, `data`, `meta` (see module doc).

    Keeps the newest `keep_last` steps plus every step that is a multiple of `keep_every`
    (0: none). With `async_save`, `save` returns once device arrays are copied to host and the
    data position is captured; files are written in the background (so the caller may donate or
    overwrite the arrays and advance the iterator right away). The next `save`, `wait` or `close`
    waits for the previous write.
    """

    def __init__(self, directory: str, *, every: int, keep_last: int, keep_every: int = 0,
                 async_save: bool = True):
        if every <= 0 or keep_last <= 0:
            raise ValueError(f"checkpoint: every ({every}) and keep_last ({keep_last}) must be > 0")
        policies = [ocp.checkpoint_managers.LatestN(keep_last)]
        if keep_every > 0:
            policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,  # what a killed save left behind
        )
        self.directory = str(directory)
        self.every = every
        self._mngr = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options)
        # Steps this process wrote or restored. Another step on disk that the run reaches again
        # was left by an earlier run and found unreadable (the restore fell back past it): it is
        # replaced rather than kept, or every later restart would fall back past it again.
        self._known: set[int] = set()

    # ---------------------------------------------------------------------------------------
    # Queries

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step (in-flight async saves included once `save` returned)."""
        return self._mngr.latest_step()

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.every == 0

    # ---------------------------------------------------------------------------------------
    # Save

    def save(self, step: int, *, state: Any, cache: Any, data_iter: Any, meta: dict,
             force: bool = False) -> bool:
        """Save `step` (every N, or any step with `force`); returns whether it saved.

        `state` and `cache` are pytrees of (sharded) jax arrays; `data_iter` a Grain
        DatasetIterator (or anything with get_state() -> bytes / set_state(bytes)).
        """
        if not (force or self.should_save(step)):
            return False
        if step in self._mngr.all_steps():
            if step in self._known:
                return False  # e.g. the final save right after the periodic one
            log.warning("replacing checkpoint step %d in %s: an earlier run wrote it and did not "
                        "restore it", step, self.directory)
            self._mngr.delete(step)
        meta = {**meta, "step": int(step), "schema_version": SCHEMA_VERSION,
                "code_version": meta.get("code_version") or bst_dist.__version__}
        items = {
            "state": ocp.args.StandardSave(state),
            "data": LaneSave(data_iter),
            "meta": ocp.args.JsonSave(meta),
        }
        if _has_leaves(cache):
            items["cache"] = ocp.args.StandardSave(cache)
        saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
        if saved:
            self._known.add(step)
        return bool(saved)

    # ---------------------------------------------------------------------------------------
    # Restore

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
                error = e
            if not any_process(error is not None):
                return result
            reason = _first_line(error) if error is not None else "another process failed to read it"
            if step is not None:
                raise NoReadableCheckpoint(
                    f"checkpoint {self.directory} step {s} is unreadable ({reason})") from error
            if i + 1 < len(candidates):
                log.warning("checkpoint step %d is unreadable (%s); falling back to step %d",
                            s, reason, candidates[i + 1])
            else:
                log.warning("checkpoint step %d is unreadable (%s); no older checkpoint", s, reason)
                raise NoReadableCheckpoint(
                    f"{self.directory}: no readable checkpoint (tried steps "
                    f"{', '.join(map(str, candidates))})") from error
        raise AssertionError("unreachable")

    def read_meta(self, step: int | None = None) -> dict:
        """The `meta` JSON of `step` (None: the newest readable one)."""
        return self._with_fallback(step, self._read_meta)

    def _read_meta(self, step: int) -> dict:
        return dict(self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, *, abstract_state: Any, abstract_cache: Any, data_iter: Any,
                step: int | None = None, job_config: dict | None = None):
        """Restore (state, cache, meta, step); `data_iter` is repositioned in place.

        `abstract_*` are pytrees of jax.ShapeDtypeStruct whose `sharding` is a NamedSharding on
        the real mesh of this run (see `abstract_tree`): arrays are read and resharded onto it,
        whatever mesh wrote them. step=None: the newest step that restores, falling back past
        unreadable ones. With `job_config` (the resolved job as a dict) each candidate's meta is
        checked first with `check_compatible`, so a changed model is reported as such rather
        than as an unreadable checkpoint.
        """

        def attempt(s: int):
            if job_config is not None:
                check_compatible(self._read_meta(s), job_config, source=self.directory)
            items = {
                "state": ocp.args.StandardRestore(abstract_state),
                "data": LaneRestore(data_iter),
                "meta": ocp.args.JsonRestore(),
            }
            step_dir = self._mngr.directory / str(s)
            want_cache = _has_leaves(abstract_cache)
            if want_cache:
                if not (step_dir / "cache").exists():
                    raise IncompatibleCheckpoint(
                        f"checkpoint {self.directory} step {s} has no cache; the job's model carries one")
                items["cache"] = ocp.args.StandardRestore(abstract_cache)
            out = self._mngr.restore(s, args=ocp.args.Composite(**items))
            cache = out["cache"] if want_cache else abstract_cache
            return out["state"], cache, dict(out["meta"]), s

        result = self._with_fallback(step, attempt)
        self._known.add(result[3])
        return result

    def restore_state(self, *, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """(state, meta, step) alone, for evaluation and inspection (no data position, no cache).
        `abstract_state` may be a part of the saved state ({"params": ...}): only that is read."""

        def attempt(s: int):
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

    # ---------------------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until the in-flight async save is on disk (and raise its error, if any)."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

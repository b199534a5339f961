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
  plus "step", "format_version" and "code_version".

Orbax writes a step into a temporary directory and renames it when every item is complete, so a
half-written step (a kill during an async save) is never listed, never restored, and cleaned up
on the next start. Once a step is complete the primary process writes `integrity.json`, the
size and sha256 of every file of the step (bst_dist.train.integrity), as its last file, on a
thread of its own while training goes on (the step counts as verified once it is written). A
restore checks the step against it first, so a damaged step (flipped bytes, a truncated copy, a
deleted item, a save killed before its manifest) is never restored: `restore(step=None)` logs
one line, "checkpoint step N is unreadable (<cause>); falling back to step M", and tries the
previous one. Retention never deletes the newest verified step (written and hashed by this run,
or restored and checked), whatever `keep_last` says.

This file saves and lists; the restore side (the manifest of a written step, the check of a
step against it, the fallback, format versions and compatibility) is `train/restore.py`, the
base class of `Checkpointer`.

A save that fails (a full disk, a location that became unwritable) raises CheckpointWriteError
at the first `save` call after it failed (the loop calls `save` every step), naming the last
verified step; `check_writable()` finds an unwritable location before the first step.

Multi-process: every JAX process must construct the Checkpointer and call `save`, `restore`,
`read_meta`, `wait` and `close` in the same order with the same steps: Orbax saves and restores
are collectives (each process writes and reads its own shards, with barriers between). Works
with a local path, NFS, or `gs://bucket/...` (Orbax goes through etils epath).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import sys
import threading
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp

import bst_dist
from bst_dist.errors import UserError
from bst_dist.train.preemption import any_process
# the restore side, and the names callers import from here
from bst_dist.train.restore import (FORMAT_VERSION, IncompatibleCheckpoint, NoReadableCheckpoint,  # noqa: F401
                                    Restorer, _first_line, _has_leaves, abstract_tree, check_compatible,
                                    format_version)
from data_pipelines.checkpoint import LaneSave

log = logging.getLogger(__name__)

_ITEMS = ("state", "cache", "data", "meta")


class CheckpointWriteError(UserError, RuntimeError):
    """The checkpoint location cannot be written, or a save failed; one line naming the last
    good step. The run must stop: going on would train steps that are never saved."""


# ---------------------------------------------------------------------------------------------
# Library noise: Orbax and Grain log their own tracebacks (through absl) for failures that we
# catch and report in one line. While a Checkpointer is open those records go to a log file
# beside the checkpoints, never to the console. After a failed save, Orbax's background writes
# keep failing (a thread's error, asyncio's "exception was never retrieved" when their futures
# are collected at exit) after the Checkpointer closed: then the filter stays, so the one-line
# report is the last thing on the console.

_noise_lock = threading.Lock()
_noise_files: list[str] = []
_after_failure: list[str] = []  # the log file of a Checkpointer closed after a failed save


def _from_library(record: logging.LogRecord) -> bool:
    def ours(path: str) -> bool:
        path = path.replace(os.sep, "/")
        return any(f"/{lib}/" in path for lib in ("orbax", "grain", "tensorstore"))

    if ours(record.pathname):
        return True
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:  # asyncio reporting an uncollected Orbax future
        if ours(tb.tb_frame.f_code.co_filename):
            return True
        tb = tb.tb_next
    return False


class _LibraryNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not _from_library(record):
            return True
        with _noise_lock:
            target = _noise_files[-1] if _noise_files else (_after_failure[-1] if _after_failure else None)
        if target:
            try:
                with open(target, "a") as f:
                    f.write(logging.Formatter("%(asctime)s %(levelname)s %(pathname)s:%(lineno)d "
                                              "%(message)s").format(record) + "\n")
            except OSError:
                pass
        return False


_NOISE_FILTER = _LibraryNoise()
_NOISY_LOGGERS = ("absl", "asyncio")
_previous_unraisable: list = []


def _unraisable(u) -> None:
    """Tensorstore's callbacks for a failed read or write, aimed at the asyncio loop Orbax has
    already closed, raise "Event loop is closed" where nobody catches it: to the log file."""
    tb, noise = u.exc_traceback, False
    while tb is not None and not noise:
        noise = tb.tb_frame.f_code.co_filename.replace(os.sep, "/").endswith("asyncio/base_events.py")
        tb = tb.tb_next
    if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value) and noise:
        _NOISE_FILTER.filter(logging.LogRecord("asyncio", logging.WARNING, "/tensorstore/", 0,
                                               "ignored: %s", (u.exc_value,), None))
        return
    (_previous_unraisable[-1] if _previous_unraisable else sys.__unraisablehook__)(u)


def _quiet_libraries(log_file: str | None) -> None:
    with _noise_lock:
        _noise_files.append(log_file or "")
        if len(_noise_files) == 1 and not _after_failure:
            for name in _NOISY_LOGGERS:
                logging.getLogger(name).addFilter(_NOISE_FILTER)
            if sys.unraisablehook is not _unraisable:
                _previous_unraisable[:] = [sys.unraisablehook]
                sys.unraisablehook = _unraisable


def _unquiet_libraries(log_file: str | None, *, failed: bool = False) -> None:
    with _noise_lock:
        if (log_file or "") in _noise_files:
            _noise_files.remove(log_file or "")
        if failed:
            _after_failure.append(log_file or "")
        if not _noise_files and not _after_failure:
            for name in _NOISY_LOGGERS:
                logging.getLogger(name).removeFilter(_NOISE_FILTER)
            if sys.unraisablehook is _unraisable and _previous_unraisable:
                sys.unraisablehook = _previous_unraisable.pop()


@dataclasses.dataclass
class _KeepLastVerified:
    """Orbax preservation policy: never delete the newest verified step."""

    owner: "Checkpointer"

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [c.step == self.owner.last_verified_step for c in checkpoints]


def _cause(e: BaseException) -> str:
    """The short cause of a write error: the OS's words for it when there are some (Orbax wraps
    tensorstore's errno in a long message), else its first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    m = re.search(r"os_error_code=\W?(\d+)", str(e))
    return os.strerror(int(m.group(1))) if m else _first_line(e)


def check_writable(directory: str) -> None:
    """Create `directory`, write, read back and delete a probe file in it, so an unwritable or
    full location is found before the first step (CheckpointWriteError, one line). Every
    process probes (each writes its own shards)."""
    from etils import epath

    folder = epath.Path(directory)
    probe = folder / f".write-probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    payload = os.urandom(4096)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(payload)
        ok = probe.read_bytes() == payload
        probe.unlink()
    except OSError as e:
        raise CheckpointWriteError(f"checkpoint.dir {directory} is not writable ({_cause(e)}); "
                                   "choose a writable checkpoint.dir") from None
    if not ok:
        raise CheckpointWriteError(f"checkpoint.dir {directory}: a probe file read back different "
                                   "bytes than were written; choose another checkpoint.dir")


class Checkpointer(Restorer):
    """`ocp.CheckpointManager` with the items `state`, `cache`, `data`, `meta` (see module doc).

    Keeps the newest `keep_last` steps plus every step that is a multiple of `keep_every`
    (0: none) plus the newest verified step. With `async_save`, `save` returns once device
    arrays are copied to host and the data position is captured; files are written in the
    background (so the caller may donate or overwrite the arrays and advance the iterator right
    away). Each later `save` call checks whether that write finished (then starts hashing it on a
    thread, or raises CheckpointWriteError if it failed) and whether the hash is written; the
    next saving `save`, `wait` or `close` waits for both.
    `poll_every`: check a save in flight at steps that are multiples of it (see `_poll`).
    `log_file`: where Orbax's and Grain's own messages go while this is open (default:
    `library.log` in a local checkpoint directory; dropped for object storage).
    """

    def __init__(self, directory: str, *, every: int, keep_last: int, keep_every: int = 0,
                 async_save: bool = True, log_file: str | None = None, poll_every: int = 1):
        if every <= 0 or keep_last <= 0:
            raise ValueError(f"checkpoint: every ({every}) and keep_last ({keep_last}) must be > 0")
        self.directory = str(directory)
        self.every = every
        self.poll_every = max(int(poll_every), 1)
        self.last_verified_step: int | None = None
        self._pending: int | None = None  # a saved step whose write is not done
        self._hashing: tuple | None = None  # (step, thread, errors): its manifest being written
        self._failed = False  # a save failed: Orbax's leftovers stay off the console (see above)
        self._primary = jax.process_index() == 0
        local = "://" not in self.directory
        self.log_file = log_file or (os.path.join(self.directory, "library.log") if local else None)
        policies = [ocp.checkpoint_managers.LatestN(keep_last), _KeepLastVerified(self)]
        if keep_every > 0:
            policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,  # what a killed save left behind
        )
        try:
            self._mngr = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options)
        except OSError as e:
            raise CheckpointWriteError(f"checkpoint.dir {self.directory}: cannot be opened "
                                       f"({e.strerror or _first_line(e)})") from None
        _quiet_libraries(self.log_file)
        self._checked: set[int] = set()  # steps that matched their manifest (hash once)
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

    def step_dir(self, step: int):
        return self._mngr.directory / str(step)

    # ---------------------------------------------------------------------------------------
    # Writability and failed saves

    def check_writable(self) -> None:
        """See the module function `check_writable`."""
        check_writable(self.directory)

    def _last_good(self) -> str:
        good = self.last_verified_step
        last = f"the last good checkpoint is step {good}" if good is not None else "no checkpoint was completed"
        return f"the run stops; {last}"

    def _write_error(self, what: str, e: BaseException) -> CheckpointWriteError:
        self._failed = True
        return CheckpointWriteError(f"{what} ({_cause(e)}); {self._last_good()}")

    def _finish_pending(self) -> None:
        """Wait for the in-flight save and its manifest (see `_finish_write`, `_finish_manifest`)."""
        if self._pending is not None:
            self._finish_write()
        self._finish_manifest(block=True)

    def _finish_write(self) -> None:
        """Wait for the in-flight save, then start hashing it (process 0, on a thread: hashing a
        large state takes seconds the loop need not wait for). Raises CheckpointWriteError if it
        failed, on every process at once (a collective: a process whose own write succeeded must
        not go on to the next step's collectives alone and hang there)."""
        step, self._pending = self._pending, None
        error = None
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - whatever failed, the step is not on disk
            log.debug("background save of step %d failed", step, exc_info=True)
            error = e
        if any_process(error is not None):
            raise self._write_error(f"checkpoint step {step} could not be written to {self.directory}",
                                    error or RuntimeError("another process could not write its part")) from None
        if step is None:
            return
        self._start_manifest(step)

    def _poll(self, step: int) -> None:
        """Called every step; every `poll_every` steps (the loop: train.log_every, when it reads
        the metrics anyway): once the in-flight save is done on every process, start hashing it
        (or report its failure); once the hash is written, that step is verified. A collective
        (with several processes) at those steps only, while a save or its hash is in flight."""
        if step % self.poll_every:
            return
        if self._pending is not None:
            if any_process(self._mngr.is_saving_in_progress()):
                return
            self._finish_write()
        self._finish_manifest(block=False)

    # ---------------------------------------------------------------------------------------
    # Save

    def save(self, step: int, *, state: Any, cache: Any, data_iter: Any, meta: dict,
             force: bool = False) -> bool:
        """Save `step` (every N, or any step with `force`); returns whether it saved.

        `state` and `cache` are pytrees of (sharded) jax arrays; `data_iter` a Grain
        DatasetIterator (or anything with get_state() -> bytes / set_state(bytes)).
        Called every step: it also reports (CheckpointWriteError) a background save that failed.
        """
        self._poll(step)
        if not (force or self.should_save(step)):
            return False
        self._finish_pending()
        if step in self._mngr.all_steps():
            if step in self._known:
                return False  # e.g. the final save right after the periodic one
            log.warning("replacing checkpoint step %d in %s: an earlier run wrote it and did not "
                        "restore it", step, self.directory)
            self._mngr.delete(step)
        meta = {k: v for k, v in meta.items() if k != "schema_version"}
        meta = {**meta, "step": int(step), "format_version": FORMAT_VERSION,
                "code_version": meta.get("code_version") or bst_dist.__version__}
        items = {
            "state": ocp.args.StandardSave(state),
            "data": LaneSave(data_iter),
            "meta": ocp.args.JsonSave(meta),
        }
        if _has_leaves(cache):
            items["cache"] = ocp.args.StandardSave(cache)
        try:
            saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
        except (OSError, ValueError) as e:
            log.debug("save of step %d failed", step, exc_info=True)
            raise self._write_error(f"checkpoint step {step} could not be written to {self.directory}", e) from None
        if saved:
            self._known.add(step)
            self._pending = step
            if not self._mngr.is_saving_in_progress():
                self._finish_pending()  # synchronous save: hash it now
        return bool(saved)

    # ---------------------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until the in-flight async save is on disk and hashed (CheckpointWriteError if
        it failed)."""
        if self._pending is not None:
            self._finish_pending()
        else:
            try:
                self._mngr.wait_until_finished()
            except Exception as e:  # noqa: BLE001
                raise self._write_error(f"a checkpoint save to {self.directory} failed", e) from None
            self._finish_manifest(block=True)

    def close(self) -> None:
        try:
            self._finish_pending()
        finally:
            try:
                self._mngr.close()
            except Exception:  # noqa: BLE001 - a failed save was reported by _finish_pending
                log.debug("closing the checkpoint manager failed", exc_info=True)
            finally:
                _unquiet_libraries(self.log_file, failed=self._failed)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

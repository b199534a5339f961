"""The run-directory lock: one training run writes a run directory at a time.

Two runs on one run directory would interleave their checkpoints, metrics and job.yaml, and each
would later resume from the other's steps. So JAX process 0 of a run creates `run.lock` in the
run directory before it writes anything there, holding who it is:

  {"host": "node-3", "pid": 4242, "pid_start": "81234567", "started": "2026-12-02T13:05:00Z",
   "job": "ray:02000000"}

and deletes it when the run ends (finished, failed or stopped). A run that finds a lock:

* takes it over when its holder is dead: same host, and that pid is gone (or is another process
  now: its start time in /proc differs), e.g. after a SIGKILL or a lost node's restart there;
* takes it over when the holder is the same job (the same Ray job id): Ray Train restarting the
  worker group of a job, whose old process 0 may have run on another host;
* otherwise is refused (RunLocked, one line naming the holder's host, pid and start time).

A holder on another host cannot be checked from here: if it is gone for good, deleting the file
is the way (the message says so). The lock is advisory: it keeps bst_dist runs apart, nothing
else. Creating it is atomic (O_EXCL); a take-over writes a temporary file and renames it over
the old lock, then reads it back, so of two runs taking over one dead holder's lock only one goes
on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid

from bst_dist.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunLocked(UserError):
    """Another live run holds the run directory."""


def _pid_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/<pid>/stat), to tell a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, pid_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    now = _pid_start(pid)
    return not (pid_start and now and now != pid_start)


def current_job_id() -> str | None:
    """The job this process belongs to, the same for every worker group Ray Train starts for it:
    the Ray job id when Ray runs this process, else none (a --no-ray run is its own job)."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; importing it here costs seconds
    if ray is None:
        return None
    try:
        if ray.is_initialized():
            return f"ray:{ray.get_runtime_context().get_job_id()}"
    except Exception:  # noqa: BLE001 - no Ray, or no job context: not a Ray job
        log.debug("no Ray job id", exc_info=True)
    return None


class RunLock:
    """`with RunLock(run_dir):` holds the run directory (see module doc); `job`: the job id that
    lets a restarted worker group of the same job take the lock over (default current_job_id())."""

    def __init__(self, run_dir: str, *, job: str | None = None):
        self.run_dir = str(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_FILE)
        self.job = job if job is not None else current_job_id()
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "job": self.job,
                   "token": uuid.uuid4().hex}
        self.held = False

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # a half-written or foreign file: nobody we can name

    def _describe(self, h: dict) -> str:
        job = f", job {h['job']}" if h.get("job") else ""
        return f"pid {h.get('pid')} on host {h.get('host')} since {h.get('started')}{job}"

    def _why_take_over(self, h: dict) -> str | None:
        if self.job and h.get("job") == self.job:
            return "a restarted worker group of the same job"
        if not h:
            return None
        if h.get("host") == self.me["host"] and isinstance(h.get("pid"), int):
            if h["pid"] == os.getpid():
                return "this process"
            if not _alive(h["pid"], h.get("pid_start")):
                return "its holder is gone"
        return None

    def acquire(self) -> "RunLock":
        os.makedirs(self.run_dir, exist_ok=True)
        data = json.dumps(self.me)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._read()
            if holder is None:  # released in between
                return self.acquire()
            why = self._why_take_over(holder)
            if why is None:
                who = self._describe(holder) if holder else "an unreadable lock"
                raise RunLocked(f"train.run_dir {self.run_dir} is in use by another run ({who}); stop that run "
                                f"or choose another train.run_dir (if it is gone, delete {self.path})") from None
            tmp = f"{self.path}.{self.me['token']}.tmp"
            with open(tmp, "w") as f:
                f.write(data)
            os.replace(tmp, self.path)
            if (self._read() or {}).get("token") != self.me["token"]:
                raise RunLocked(f"train.run_dir {self.run_dir}: another run took over its lock at the same "
                                f"time ({self._describe(self._read() or {})})") from None
            log.warning("took over the run lock of %s: %s", self._describe(holder), why)
        else:
            with os.fdopen(fd, "w") as f:
                f.write(data)
        self.held = True
        return self

    def release(self) -> None:
        """Delete the lock if it is still ours (a take-over by a restarted group leaves theirs)."""
        if self.held and (self._read() or {}).get("token") == self.me["token"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

"""`bst-dist submit/status/stop`: a job on a Ray cluster through its job server (JobSubmissionClient).

What the cluster gets (docs/launch.md, "Submission"): the working dir (default ".", the project
root) uploaded as the job's `working_dir`, which Ray unpacks on every node and puts first on
PYTHONPATH for the entrypoint and every worker, so the cluster runs exactly this checkout's
bst_dist; plus the YAML's `ray.runtime_env` (env_vars, pip, excludes, ...). The entrypoint is
`python -m bst_dist train JOB.yaml --set ...`: it needs Python with the dependencies (the
cluster image), not an installed `bst-dist` script. The job's resources for the entrypoint come
from `ray.entrypoint_resources` (CPU, GPU, memory, or custom resources); the driver stays on the
head in any case (see entrypoint_resources).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
from typing import Iterator, Optional, TextIO

from bst_dist.config import ConfigError, JobConfig

# Never uploaded: run outputs, VCS data, caches, wheels (the upload limit is a few hundred MB).
DEFAULT_EXCLUDES = [".git", "runs/", ".whl/", "__pycache__/", "*.pyc", ".pytest_cache/", "bench/out/", ".anchors/"]
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def job_runtime_env(cfg: JobConfig, working_dir: Optional[str] = None) -> dict:
    """The job's runtime_env: the YAML's, with the working dir and the default excludes."""
    env = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
           for k, v in cfg.ray.runtime_env.items()}
    wd = working_dir or env.get("working_dir") or "."
    env["working_dir"] = wd if "://" in wd else os.path.abspath(wd)
    env["excludes"] = list(dict.fromkeys([*DEFAULT_EXCLUDES, *env.get("excludes", [])]))
    # Ray's job server reads this in the job's supervisor (which gets the job's env_vars): how long
    # a stopped driver has for the workers' final checkpoint before it is SIGKILLed.
    from bst_dist.launch.stop import DEFAULT_STOP_WAIT_S, STOP_WAIT_ENV

    env["env_vars"] = {STOP_WAIT_ENV: str(DEFAULT_STOP_WAIT_S), **(env.get("env_vars") or {})}
    return env


def entrypoint(job_in_working_dir: str, overrides: list[str]) -> str:
    args = ["python", "-m", "bst_dist", "train", job_in_working_dir]
    for o in overrides:
        args += ["--set", o]
    return shlex.join(args)


def job_path_in(job: str, working_dir: str) -> str:
    """The job file's path relative to the working dir (the entrypoint runs there)."""
    if "://" in working_dir:
        return job  # a packaged working dir: the path is taken as given
    rel = os.path.relpath(os.path.abspath(job), os.path.abspath(working_dir))
    if rel.startswith(".."):
        raise ConfigError(f"{job}: the job file must lie inside the working dir {working_dir!r} that is uploaded "
                          "(use --working-dir)")
    return rel


# Ray's own resource of the head node (1 there, absent elsewhere).
HEAD_RESOURCE = "node:__internal_head__"


def entrypoint_resources(cfg: JobConfig) -> dict:
    """ray.entrypoint_resources -> submit_job keyword arguments. Ray pins an entrypoint to the head
    only when it asks for no resources; with any, the driver may land on a GPU/TPU host, and
    losing that host kills the job whatever ray.max_failures says. So any request also asks for
    a sliver of the head's own resource, which keeps the driver on the head."""
    res = dict(cfg.ray.entrypoint_resources)
    if not res:
        return {}
    res.setdefault(HEAD_RESOURCE, 0.001)
    kwargs: dict = {}
    if "CPU" in res:
        kwargs["entrypoint_num_cpus"] = res.pop("CPU")
    if "GPU" in res:
        kwargs["entrypoint_num_gpus"] = res.pop("GPU")
    if "memory" in res:
        kwargs["entrypoint_memory"] = int(res.pop("memory"))
    if res:
        kwargs["entrypoint_resources"] = {k: float(v) for k, v in res.items()}
    return kwargs


@contextlib.contextmanager
def _explicit_address(address: Optional[str]) -> Iterator[None]:
    """Ray's client lets $RAY_ADDRESS override an explicit address; an explicit one should win."""
    saved = {k: os.environ.pop(k) for k in ADDRESS_ENV if address and k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def client(address: Optional[str] = None):
    """A JobSubmissionClient: --address, else $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS, else
    http://127.0.0.1:8265. A token in the environment turns on token auth (RAY_AUTH_MODE)."""
    from bst_dist.launch import _enable_token_auth_if_given

    _enable_token_auth_if_given()
    from ray.job_submission import JobSubmissionClient

    with _explicit_address(address):
        try:
            return JobSubmissionClient(address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"job server {address or os.environ.get('RAY_ADDRESS') or 'http://127.0.0.1:8265'}: "
                              f"{str(e).splitlines()[0]}") from None


def stream_logs(c, job_id: str, out: TextIO) -> None:
    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())


def wait_status(c, job_id: str, timeout: float = 60.0) -> str:
    """The job's status once terminal (logs can end a moment before the status does)."""
    deadline = time.monotonic() + timeout
    while True:
        status = str(c.get_job_status(job_id).value)
        if status in EXIT_CODES or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def submit(cfg: JobConfig, job: str, overrides: list[str], *, address: Optional[str] = None,
           working_dir: Optional[str] = None, wait: bool = True, out: TextIO = sys.stdout) -> int:
    """Submit `job` (with its `--set` overrides); stream its logs; exit code from the final status."""
    runtime_env = job_runtime_env(cfg, working_dir)
    ep = entrypoint(job_path_in(job, runtime_env["working_dir"]), overrides)
    c = client(address)
    submission_id = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    job_id = c.submit_job(entrypoint=ep, runtime_env=runtime_env, submission_id=submission_id,
                          metadata={"bst_dist_job": cfg.name}, **entrypoint_resources(cfg))
    print(f"bst-dist submit: job {job_id} submitted: {ep}", file=sys.stderr)
    if not wait:
        print(job_id, file=out)
        return 0
    try:
        stream_logs(c, job_id, out)
    except KeyboardInterrupt:
        print(f"\nbst-dist submit: stopped following {job_id}; it keeps running. `bst-dist status {job_id}`, "
              f"`bst-dist stop {job_id}`", file=sys.stderr)
        return 130
    status = wait_status(c, job_id)
    info = c.get_job_info(job_id)
    tail = f": {info.message}" if status != "SUCCEEDED" and info.message else ""
    print(f"bst-dist submit: job {job_id} {status}{tail}", file=sys.stderr)
    return EXIT_CODES.get(status, 1)


def status(job_id: str, *, address: Optional[str] = None) -> tuple[str, str]:
    info = client(address).get_job_info(job_id)
    return str(info.status.value), info.message or ""


def stop(job_id: str, *, address: Optional[str] = None, wait: Optional[float] = None) -> str:
    """Stop the job and wait for its final status: by default as long as the job server waits for
    the driver's final checkpoint (RAY_JOB_STOP_WAIT_TIME_S), plus a margin for the status."""
    from bst_dist.launch.stop import DEFAULT_STOP_WAIT_S

    wait = DEFAULT_STOP_WAIT_S + 30.0 if wait is None else wait
    c = client(address)
    c.stop_job(job_id)
    return wait_status(c, job_id, timeout=wait)

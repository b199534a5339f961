"""A private, loopback-only Ray head on this machine: the embedded default of `bst-dist train`.

Why `ray start --head --block` in a subprocess rather than `ray.init()` starting a cluster: the head
lives in its own process group and temp dir, so `stop()` ends exactly what `start()` started
(never `ray stop`, which ends every Ray process of the user on the machine), and the same class
gives tests a head with the job server.

Loopback only. With Ray 2.60 on Linux `--node-ip-address=127.0.0.1` is silently replaced by the
machine's routable IP, and the GCS, raylet and core-worker gRPC servers listen on all interfaces.
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (Ray's single-node switch, the default on macOS/Windows)
keeps the node IP at 127.0.0.1; every server then binds 127.0.0.1 only (checked with `ss -ltn`:
GCS, raylet, workers, dashboard, dashboard agent, runtime-env agent, client server, metrics).
Fixed default ports (8265, 10001, 52365, 44217, 44227) are replaced by free ones so that several
heads can coexist on one machine.

Private files. Ray makes its temp dir world-writable, so the head's temp dir is a folder inside a
0700 one of ours; the head's TPU_LOG_DIR is an empty folder there, so Ray does not link the
machine-wide /tmp/tpu_logs into its logs and print it to the driver (`worker_env()` gives the
workers libtpu's real one).

Authentication. Ray 2.60 has token auth, but a client that names an explicit address never turns
it on by itself. Each head gets its own random token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN): other
users of the machine cannot reach it even over loopback, and nothing is written to ~/.ray.
`client_env()` is what a client process (driver, `ray job submit`, `bst-dist submit`) needs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

LOOPBACK = "127.0.0.1"
DEFAULT_TPU_LOG_DIR = "/tmp/tpu_logs"  # libtpu's, and what Ray links into its logs when it exists
SINGLE_NODE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port(host: str = LOOPBACK) -> int:
    """A port that is free now on `host` (the usual bind-to-0 probe; racy by nature, fine here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(address: Optional[str]) -> bool:
    """True for a Ray address on this machine's loopback ("127.0.0.1:6379", "localhost:6379")."""
    if not address:
        return False
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def use_loopback_driver(token: Optional[str] = None) -> None:
    """Make this process a single-node Ray driver, so that `ray.init("127.0.0.1:PORT")` is not
    rewritten to the machine's routable IP (where a loopback-only head does not listen), and,
    with `token`, authenticate to a head started with that token."""
    os.environ.update(SINGLE_NODE_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # read at import time; the call sites read the module attribute
        constants.ENABLE_RAY_CLUSTER = False
    if token is not None:
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        refresh_auth()


def connect(address: str, token: Optional[str] = None, **init_kwargs):
    """`ray.init` this process as a driver of a loopback-only head (LocalRay's address/token)."""
    import ray

    use_loopback_driver(token)
    return ray.init(address=address, **init_kwargs)


def refresh_auth() -> None:
    """Make an already imported Ray re-read RAY_AUTH_MODE and the token (it caches both)."""
    if "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _die_with_parent() -> None:
    """preexec_fn: the head gets SIGTERM (and cleans up) when the launching process dies, even by
    SIGKILL; otherwise an embedded head would outlive a killed `bst-dist train`. Linux only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _ray_executable() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "ray")
    return here if os.path.exists(here) else (shutil.which("ray") or "ray")


class LocalRay:
    """Start/stop one Ray head bound to 127.0.0.1. Use as a context manager or start()/stop().

    address: the GCS address for `ray.init(address=...)`; dashboard_url: the job-server URL
    (only with dashboard=True); temp_dir: Ray's session/log dir for this head (default: inside a
    new private folder, removed by stop()).
    """

    def __init__(self, *, num_cpus: Optional[int] = None, dashboard: bool = False,
                 temp_dir: Optional[str] = None, env: Optional[dict] = None, startup_timeout: float = 90.0):
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.dashboard = dashboard
        self.temp_dir = temp_dir
        self.env = env
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.address: Optional[str] = None
        self.dashboard_url: Optional[str] = None
        self._owns_temp = False
        self._private: Optional[str] = None  # the 0700 folder around an owned temp_dir
        self._tpu_log_dir = DEFAULT_TPU_LOG_DIR
        self._log = None
        self.token = secrets.token_hex(32)

    def __enter__(self) -> "LocalRay":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "LocalRay":
        if self.proc is not None:
            return self
        if self.temp_dir is None:
            # Private: Ray makes its temp dir world-writable (chmod 0777, for machines shared by
            # several users' Ray), so it goes inside a folder only we can enter (mkdtemp: 0700),
            # with this head's logs, sockets and the job's files. Short path: Ray's unix sockets
            # live under it and must stay < 108 characters.
            self._private = tempfile.mkdtemp(prefix="bst-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
            self.temp_dir = os.path.join(self._private, "ray")
            self._owns_temp = True
        os.makedirs(self.temp_dir, exist_ok=True)
        # Ray links $TPU_LOG_DIR (else the machine-wide /tmp/tpu_logs, libtpu's log folder, other
        # users' runs included) into the session logs and prints every line of it to the driver.
        # An empty folder of our own instead; the workers get the real one back (worker_env()).
        no_tpu_logs = os.path.join(self.temp_dir, "tpu_logs")
        os.makedirs(no_tpu_logs, exist_ok=True)
        port = free_port()
        cmd = [
            _ray_executable(), "start", "--head", "--block",
            f"--port={port}", f"--node-ip-address={LOOPBACK}", f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.num_cpus}", "--disable-usage-stats",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]
        if self.dashboard:
            dport = free_port()
            cmd += ["--include-dashboard=true", f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dport}"]
            self.dashboard_url = f"http://{LOOPBACK}:{dport}"
        else:
            cmd += ["--include-dashboard=false"]
        env = dict(os.environ if self.env is None else self.env)
        self._tpu_log_dir = env.get("TPU_LOG_DIR", DEFAULT_TPU_LOG_DIR)
        env["TPU_LOG_DIR"] = no_tpu_logs
        env.update(self.client_env())
        env["AUTOSCALER_METRIC_PORT"] = str(free_port())
        env["DASHBOARD_METRIC_PORT"] = str(free_port())
        # stop(): no 30 s "drain before shutdown" (Ray 2.60's SIGTERM handling of a head).
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        if self.dashboard_url:
            # Ray Train's placement-group cleaner finds the state API by scanning the machine for
            # Ray instances, which fails when several run (other users, tests): name ours.
            env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        env.pop("RAY_ADDRESS", None)
        self._log = open(os.path.join(self.temp_dir, "head.log"), "ab")
        # Own session: stop() can signal exactly this head's process group.
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self._wait_ready(port)
        self.address = f"{LOOPBACK}:{port}"
        return self

    def worker_env(self) -> dict:
        """Environment the job's workers need on this head: libtpu's own log folder (the head's
        TPU_LOG_DIR is the empty one that keeps Ray from printing libtpu's logs)."""
        return {"TPU_LOG_DIR": self._tpu_log_dir}

    def client_env(self) -> dict:
        """Environment a client of this head needs (merge into a subprocess's env)."""
        return {**SINGLE_NODE_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def connect(self, **init_kwargs):
        """`ray.init` this process as a driver of this head."""
        return connect(self.address, self.token, **init_kwargs)

    def _wait_ready(self, port: int) -> None:
        marker = os.path.join(self.temp_dir, "ray_current_cluster")
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"local Ray head exited with status {self.proc.returncode}: {self.log_tail()}")
            if os.path.exists(marker):
                with open(marker) as f:
                    if f.read().strip().endswith(f":{port}"):
                        return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"local Ray head did not start within {self.startup_timeout:.0f}s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(os.path.join(self.temp_dir, "head.log"), "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the head (it ends the processes it started), then SIGKILL its process group."""
        proc, self.proc = self.proc, None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the group id is the head's pid
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._owns_temp and self._private:
            shutil.rmtree(self._private, ignore_errors=True)
        self.address = None

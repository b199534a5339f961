"""The stop path of a job (launch/stop.py) on a real local Ray, without Ray Train or JAX: a
driver blocked in `ray.get` on a worker actor gets SIGTERM (what `ray job stop` sends it), sets
the StopSignal actor, the worker's watch thread turns it into its stop Event, the worker "saves"
the step it is at and returns, and the driver exits 143 after the worker did. The full path
(Ray Train workers, a real checkpoint, the resumed run equal to an uninterrupted one) is the
slow test in tests/launch/test_launch_ray.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.paths import REPO

pytest.importorskip("ray")


DRIVER = r"""
import os, sys, threading, time
import ray
from bst_dist.launch.local import SINGLE_NODE_ENV
from bst_dist.launch.stop import driver_sigterm_sets, make_stop_signal, watch

out = sys.argv[1]

@ray.remote(num_cpus=0)
class Worker:
    def run(self, stop_signal, out):
        stop = threading.Event()
        watch(stop_signal, lambda why: stop.set())
        for step in range(1, 10_000):
            time.sleep(0.05)  # one "training step"
            open(os.path.join(out, f"step-{step}"), "w").close()
            if stop.is_set():
                open(os.path.join(out, f"saved-{step}"), "w").close()  # the final checkpoint
                return step
        return None

os.environ.update(SINGLE_NODE_ENV)
ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
stop_signal = make_stop_signal()
with driver_sigterm_sets(stop_signal) as fired:
    step = ray.get(Worker.remote().run.remote(stop_signal, out))
print("worker returned at step", step, flush=True)
sys.exit(143 if fired.is_set() else 0)
"""


def test_driver_sigterm_makes_the_worker_save_and_return_before_the_driver_exits(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "step-3").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0][-3000:]
            time.sleep(0.05)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, out[-3000:]
    saved = [int(f.name.split("-")[1]) for f in tmp_path.glob("saved-*")]
    last = max(int(f.name.split("-")[1]) for f in tmp_path.glob("step-*"))
    # the worker saved once, at the step it stopped at, and the driver waited for it
    assert saved == [last] and last >= 3 and f"worker returned at step {last}" in out, out[-3000:]
    assert "asking every worker to checkpoint and stop" in out
    assert took < 30, f"the stop took {took:.1f} s"

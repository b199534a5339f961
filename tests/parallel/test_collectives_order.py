"""Which layouts reduce in the same order on CPU (docs/training.md, "Numeric tolerances"): a
float32 sum over `data` on 8 devices, mesh position i on device i, as 1 process of 8 devices,
2 of 4 and 4 of 2 (real jax.distributed processes on 127.0.0.1).

In one process XLA adds the devices' rows in mesh order; across processes every device is its own
rank of the CPU collectives (gloo), so 2 x 4 and 4 x 2 add in one order, the same whatever the
process count, but not the in-process one. That is why a resume from P processes onto Q > 1
processes at the same mesh positions is bitwise, and a resume between 1 and P processes is 1e-5
(tests/train/test_train_processes.py)."""

import os
import subprocess
import sys

import numpy as np

from tests.parallel.collectives_sum import rows
from tests.train.test_train_processes import free_port
from tests.helpers.paths import REPO

HERE = os.path.dirname(os.path.abspath(__file__))


def total(procs: int, tmp_path) -> np.ndarray:
    out, port = str(tmp_path / f"sum_{procs}.npy"), str(free_port())
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // procs}", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO)
    ps = [subprocess.Popen([sys.executable, os.path.join(HERE, "collectives_sum.py"), str(procs), str(i), port, out],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(procs)]
    for p in ps:
        text, _ = p.communicate(timeout=300)
        assert p.returncode == 0, text[-3000:]
    return np.load(out)


def test_multi_process_sums_agree_bitwise_whatever_the_process_count(tmp_path):
    x = rows()
    in_order = x[0].copy()
    for row in x[1:]:
        in_order = in_order + row
    np.testing.assert_array_equal(total(1, tmp_path), in_order)  # one process: mesh order
    two, four = total(2, tmp_path), total(4, tmp_path)
    np.testing.assert_array_equal(two, four)  # 2 x 4 and 4 x 2: one order
    np.testing.assert_allclose(two, in_order, rtol=1e-5, atol=1e-5 * np.abs(x).max())  # another order, close

"""Two real JAX processes (jax.distributed on CPU) each load their own lanes; the global batch
assembled with jax.make_array_from_process_local_data equals the single-process batch, and the
Orbax checkpoint they write together restores a single process that continues exactly."""

import os
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp

from data_pipelines import make_loader
from data_pipelines.checkpoint import LaneRestore

from tests.data.corpora import data_cfg
from tests.helpers.paths import REPO

L, B, STEPS = 16, 8, 6
KEYS = ("inputs", "targets", "loss_mask", "doc_start", "doc_id", "seq_index")

WORKER = r'''
import sys
import jax

pid, port, path, ckpt, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bst_dist.config import DataConfig
from data_pipelines import make_loader
from data_pipelines.checkpoint import LaneSave

L, B, STEPS = %d, %d, %d
assert jax.process_count() == 2 and len(jax.devices()) == 8
mesh = Mesh(np.array(jax.devices()), ("data",))  # process p's devices hold rows [4p, 4p+4)
loader = make_loader(DataConfig(path=path), seq_len=L, global_batch_size=B,
                     process_index=jax.process_index(), process_count=jax.process_count())
result = {}
for step in range(STEPS):
    local = next(loader)
    assert local["inputs"].shape == (B // 2, L)
    for k, v in local.items():
        if v.dtype == np.int64:
            v = v.astype(np.int32)  # JAX without x64: bookkeeping ids travel as int32
        spec = P("data", *([None] * (v.ndim - 1)))
        arr = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), v)
        assert arr.shape == (B,) + v.shape[1:]
        result[f"{step}/{k}"] = np.asarray(multihost_utils.process_allgather(arr, tiled=True))
mngr = ocp.CheckpointManager(ckpt, item_names=("data",))
mngr.save(STEPS, args=ocp.args.Composite(data=LaneSave(loader)))
mngr.wait_until_finished()
mngr.close()
loader.close()
if pid == 0:
    np.savez(out, **result)
''' % (L, B, STEPS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_assemble_the_single_process_batch(pg19_prepared, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "global.npz")
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(i), port, pg19_prepared, ckpt, out], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    ref_loader = make_loader(data_cfg(pg19_prepared), seq_len=L, global_batch_size=B)
    ref = [next(ref_loader) for _ in range(2 * STEPS)]
    ref_loader.close()
    got = np.load(out)
    for step in range(STEPS):
        for k in KEYS:
            np.testing.assert_array_equal(got[f"{step}/{k}"], ref[step][k].astype(got[f"{step}/{k}"].dtype),
                                          err_msg=f"step {step} {k}")

    # The checkpoint the two processes wrote restores one process, which continues exactly.
    assert sorted(os.listdir(os.path.join(ckpt, str(STEPS), "data")))[-2:] == \
        ["process_0-of-2.json", "process_1-of-2.json"]
    loader = make_loader(data_cfg(pg19_prepared), seq_len=L, global_batch_size=B)
    mngr = ocp.CheckpointManager(ckpt, item_names=("data",))
    mngr.restore(STEPS, args=ocp.args.Composite(data=LaneRestore(loader)))
    mngr.close()
    for step in range(STEPS, 2 * STEPS):
        batch = next(loader)
        for k in KEYS:
            np.testing.assert_array_equal(batch[k], ref[step][k])
    loader.close()

"""One process of tests/parallel/test_collectives_order.py: the sum over `data` of a (8, n) float32 array
sharded one row per device (XLA inserts an all-reduce), on a mesh whose position i is device i;
process 0 writes the result to OUT.npy.

    python tests/parallel/collectives_sum.py PROCESSES PROCESS_ID PORT OUT.npy
"""

import sys

import numpy as np


def rows() -> np.ndarray:
    """Rows of very different magnitudes, so that any change of summation order shows."""
    x = np.random.default_rng(0).standard_normal((8, 1 << 14)).astype(np.float32)
    return x * np.logspace(-3, 3, 8, dtype=np.float32)[:, None]


def main(procs: int, pid: int, port: str, out: str) -> None:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if procs > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", procs, pid)
    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices())
    mine = [i for i, d in enumerate(mesh.devices.ravel()) if d.process_index == jax.process_index()]
    x = rows()
    arr = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), x[mine[0]:mine[-1] + 1])
    total = jax.jit(lambda a: a.sum(0), out_shardings=NamedSharding(mesh, P()))(arr)
    if pid == 0:
        np.save(out, np.asarray(total.addressable_data(0)))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])

"""Parameter init of a job's state, two ways, in one process on the default device:

  jit    what `train/state.py:create` does: one jitted init with the state's out_shardings
         (trace, lower and compile timed apart, then the run);
  eager  the model built op by op (each distinct op compiled once), then placed into the
         shardings with device_put; run twice, so the second shows the cost without compiles.

    python bench/init_bench.py --out bench/results/h200                          # jobs/pg19_400m.yaml
    JAX_PLATFORMS=cpu python bench/init_bench.py --out /tmp/ib --job jobs/local_tiny.yaml

No compilation cache is used. Writes OUT/init_bench.json (device, versions, command).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import runner  # noqa: E402

# one device, whatever the job's cluster placement
ONE_DEVICE = ["train.global_batch_size=1", "ray.use_gpu=false", "ray.num_workers=1", "ray.resources_per_worker={}",
              "ray.accelerator_type=null", "ray.placement_strategy=PACK", "train.compile_cache="]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--job", default="jobs/pg19_400m.yaml")
    ap.add_argument("--skip", default="", help="comma list of ways to skip: jit, eager")
    a = ap.parse_args()
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bst_dist import config, parallel
    from bst_dist.train import state as state_mod

    compiles = [0]

    def listener(event: str, duration: float, **kw) -> None:
        compiles[0] += event == "/jax/core/compile/backend_compile_duration"

    jax.monitoring.register_event_duration_secs_listener(listener)
    cfg = config.load(os.path.join(runner.ROOT, a.job), ONE_DEVICE)
    mesh = parallel.make_mesh(cfg.mesh)
    t0 = time.perf_counter()
    setup, _, factory = state_mod.plan(cfg, mesh)
    row: dict = {"plan_s": time.perf_counter() - t0}

    def init():
        params = nnx.split(factory())[1]
        return {"params": params, "opt_state": setup.tx.init(params), "step": jnp.zeros((), jnp.int32)}

    if "jit" not in a.skip:
        t0 = time.perf_counter()
        lowered = jax.jit(init, out_shardings=setup.state_shardings).lower()
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        state = compiled()
        jax.block_until_ready(state)
        t3 = time.perf_counter()
        row["jit"] = {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "run_s": t3 - t2, "total_s": t3 - t0}
        del state, compiled, lowered
    if "eager" not in a.skip:
        runs = []
        for _ in range(2):
            compiles[0] = 0
            t0 = time.perf_counter()
            state = jax.device_put(init(), setup.state_shardings)
            jax.block_until_ready(state)
            runs.append({"total_s": time.perf_counter() - t0, "backend_compiles": compiles[0]})
            del state
        row["eager"] = runs
    n = sum(x.size for x in jax.tree.leaves(nnx.eval_shape(factory)))
    path = runner.write(a.out, "init_bench", {"job": a.job, "parameters": int(n), **row})
    print(row)
    print("wrote", path)


if __name__ == "__main__":
    main()

"""The 400M train step (jobs/pg19_400m.yaml's model, dropout 0, cuDNN attention) on one device,
the real `bst_dist.train.step.make_train_step`, against the plain-JAX sliding-window decoder peer
(`.anchors/anchor_jax_lm.py window`) and the torch.compile GPT-2-medium peer (`.anchors/anchor_gpu.py
torch:4096:B:compile`), each run in its own process in the same call when `.anchors/` is present.

    python bench/step_bench.py --out bench/results/h200 --impls chunked,fft
    python bench/step_bench.py --tiny --out /tmp/sb --impls chunked      # CPU smoke test

Each variant is a configuration (`model.bst.ssm_impl`); each runs in its own process so peak
memory is its own. Writes OUT/step_bench.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import cases, runner  # noqa: E402


def run_step(impl: str, batch: int, steps: int, tiny: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bst_dist import config, parallel
    from bst_dist.models.flops import attention_flops, train_step_flops
    from bst_dist.models import cache_shape
    from bst_dist.train import state as state_mod
    from bst_dist.train import step as step_mod

    cfg = config.from_dict(cases.step_job(impl, batch, tiny))
    mesh = parallel.make_mesh(cfg.mesh)
    t0 = time.perf_counter()
    setup, _, factory = state_mod.plan(cfg, mesh)

    def init():  # on the host CPU, then placed: the same values without a device compile of the init
        params = nnx.split(factory())[1]
        return {"params": params, "opt_state": setup.tx.init(params), "step": jnp.zeros((), jnp.int32)}

    with jax.default_device(jax.devices("cpu")[0]):
        host = jax.jit(init)()
    state = jax.device_put(host, setup.state_shardings)
    shapes = cache_shape(cfg.model, batch)
    cache = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                    out_shardings=setup.cache_shardings)()
    B, L, V = batch, cfg.model.seq_len, cfg.model.vocab_size
    k1, k2 = jax.random.split(jax.random.key(1))
    batch_d = jax.device_put({"inputs": jax.random.randint(k1, (B, L), 0, V, jnp.int32),
                              "targets": jax.random.randint(k2, (B, L), 0, V, jnp.int32),
                              "loss_mask": jnp.ones((B, L), jnp.float32), "doc_start": jnp.arange(B) == 0},
                             step_mod.batch_shardings(setup))
    init_s = time.perf_counter() - t0
    step = step_mod.make_train_step(setup)
    t0 = time.perf_counter()
    compiled = step.lower(state, cache, batch_d).compile()
    compile_s = time.perf_counter() - t0
    carry = [state, cache]

    def one():
        carry[0], carry[1], m = compiled(carry[0], carry[1], batch_d)
        return carry[0], m

    t = runner.timed(one, (), steps)
    flops = train_step_flops(cfg.model, B)
    m = cfg.model  # useful attention: each query against the W keys it may see, not the 2W computed
    masked_half = 3.0 * B * m.num_layers * (L // m.block_len) * attention_flops(m.block_len, m.block_len,
                                                                               m.num_heads, m.head_dim)
    return {"variant": f"BST 400M ssm_impl={impl}", "B": B, "L": L, "init_s": init_s, "compile_s": compile_s,
            "step_ms": t["ms"], "tokens_per_s": B * L / (t["ms"] / 1e3), "model_tflops": flops / (t["ms"] / 1e3) / 1e12,
            "flops_per_step": flops,
            "model_tflops_useful": (flops - masked_half) / (t["ms"] / 1e3) / 1e12, "peak_GiB": runner.peak_gib()}


def _subprocess(args: list[str], cwd: str, env=None) -> dict:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=400)
    lines = p.stdout.splitlines()
    for i in range(len(lines) - 1, -1, -1):  # the last JSON object printed, on one line or indented
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    return {"error": f"rc={p.returncode}: {p.stderr[-600:]}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impls", default="chunked,fft", help="model.bst.ssm_impl values")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: one variant, prints its JSON
    ap.add_argument("--out", help="directory for step_bench.json")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_step(a.one, a.batch, a.steps, a.tiny)))
        return
    if not a.out:
        ap.error("--out DIR is required")
    rows = []
    for impl in a.impls.split(","):
        args = [os.path.abspath(__file__), "--one", impl, "--batch", str(a.batch), "--steps", str(a.steps)]
        rows.append(_subprocess(args + (["--tiny"] if a.tiny else []), runner.ROOT))
        print(rows[-1], flush=True)
    peer_dir = os.path.join(runner.ROOT, ".anchors")
    if not a.tiny and os.path.isfile(os.path.join(peer_dir, "anchor_jax_lm.py")):
        env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"B": str(a.batch)}
        peer = _subprocess(["anchor_jax_lm.py", "window"], peer_dir, env)
        peer["variant"] = "plain-JAX window decoder (peer)"
        rows.append(peer)
        torch_peer = _subprocess(["anchor_gpu.py", f"torch:4096:{a.batch}:compile"], peer_dir, env)
        torch_row = next((v for k, v in torch_peer.items() if k.startswith("torch_gpt2")), None)
        rows.append({"variant": "torch.compile GPT-2-medium (peer)", **torch_row} if isinstance(torch_row, dict)
                    else {"variant": "torch.compile GPT-2-medium (peer)", "error": str(torch_row or torch_peer)[:300]})
        for r in rows[:-2]:
            if "tokens_per_s" in r and "tokens_per_s" in peer:
                r["x_peer"] = r["tokens_per_s"] / peer["tokens_per_s"]
            if "tokens_per_s" in r and "tokens_per_s" in rows[-1]:
                r["x_torch_compile"] = r["tokens_per_s"] / rows[-1]["tokens_per_s"]
    path = runner.write(a.out, "step_bench", {"rows": rows})
    for r in rows:
        print(f"{r.get('variant', '?'):40} tokens/s {r.get('tokens_per_s', 0):10.0f}  x_peer {r.get('x_peer', 1):5.2f}  "
              f"peak {r.get('peak_GiB', r.get('mem_GiB', 0)):6.1f} GiB  {r.get('error', '')[:100]}")
    print("wrote", path)


if __name__ == "__main__":
    main()

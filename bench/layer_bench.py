"""One layer, forward + backward of the backbone (no head), each kind at each shape, with the
ratio to the Slide layer measured in the same run.

    python bench/layer_bench.py --out bench/results/h200            # the full matrix
    python bench/layer_bench.py --tiny --out /tmp/lb                 # CPU smoke test, tiny width

--impls chunked,fft runs the S4D layers under both `model.bst.ssm_impl` values.
Writes OUT/layer_bench.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import cases, runner  # noqa: E402


def run_layer(name: str, B: int, L: int, ssm_impl: str, steps: int, tiny: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bst_dist import config
    from bst_dist.models import build

    cfg = config.from_dict({"model": cases.layer_model(name, L, ssm_impl, tiny)}).model
    model = build(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tok = jax.random.randint(jax.random.key(1), (B, L), 0, cfg.vocab_size, jnp.int32)
    cache = model.init_cache(B)
    start = jnp.arange(B) == 0  # lane 0 starts a document: both carry paths run

    def loss(state, tok, cache):
        h, _ = nnx.merge(graphdef, state).features(tok, cache, start)
        return jnp.mean(h.astype(jnp.float32) ** 2)

    fb = jax.jit(jax.value_and_grad(loss))
    compiled = fb.lower(state, tok, cache).compile()
    res = {"layer": name, "B": B, "L": L, "ssm_impl": ssm_impl if ":S4" in name else None}
    try:
        res["xla_temp_GiB"] = compiled.memory_analysis().temp_size_in_bytes / 2**30
    except Exception:  # noqa: BLE001 -- not every backend reports it
        pass
    res.update(runner.timed(compiled, (state, tok, cache), steps))
    fwd = jax.jit(loss).lower(state, tok, cache).compile()
    res["fwd_ms"] = runner.timed(fwd, (state, tok, cache), steps)["ms"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default=",".join(cases.LAYERS))
    ap.add_argument("--shapes", default=",".join(cases.SHAPES))
    ap.add_argument("--impls", default="chunked,fft", help="model.bst.ssm_impl values for the S4D layers")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="tiny width and lengths (CPU smoke test)")
    ap.add_argument("--out", required=True, help="directory for layer_bench.json")
    a = ap.parse_args()
    rows = []
    for shape in a.shapes.split(","):
        B, L = cases.SHAPES[shape]
        if a.tiny:
            B, L = 1, 64
        for name in a.layers.split(","):
            impls = a.impls.split(",") if ":S4" in name else ["-"]
            for impl in impls:
                try:
                    r = run_layer(name, B, L, impl if impl != "-" else "chunked", a.steps, a.tiny)
                except Exception as e:  # noqa: BLE001 -- record the failure, keep measuring the rest
                    r = {"layer": name, "B": B, "L": L, "ssm_impl": impl, "error": repr(e)[:400]}
                r["shape"] = shape
                rows.append(r)
                print(r, flush=True)
                runner.write(a.out, "layer_bench", {"rows": rows, "partial": True})
    for shape in a.shapes.split(","):
        base = next((r for r in rows if r["shape"] == shape and r["layer"] == "Slide" and "ms" in r), None)
        for r in rows:
            if base and r["shape"] == shape and "ms" in r:
                r["x_slide"] = r["ms"] / base["ms"]
                r["fwd_x_slide"] = r["fwd_ms"] / base["fwd_ms"]
    path = runner.write(a.out, "layer_bench", {"rows": rows})
    print(f"\n{'shape':10} {'layer':18} {'impl':8} {'fwd+bwd ms':>10} {'x Slide':>8} {'fwd ms':>8} {'temp GiB':>8}")
    for r in rows:
        if "ms" in r:
            print(f"{r['shape']:10} {r['layer']:18} {str(r['ssm_impl'] or '-'):8} {r['ms']:10.2f} "
                  f"{r.get('x_slide', 0):8.2f} {r['fwd_ms']:8.2f} {r.get('xla_temp_GiB', 0):8.2f}")
        else:
            print(f"{r['shape']:10} {r['layer']:18} {str(r['ssm_impl']):8} ERROR {r['error'][:80]}")
    print("wrote", path)


if __name__ == "__main__":
    main()

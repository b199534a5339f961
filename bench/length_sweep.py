"""Forward cost per token of the 400M job's model at training lengths L = 4k, 16k and 65k, with the
same number of tokens per call (B x L = 65,536), under each `model.bst.ssm_impl`: how far from
linear in L the model is.

    python bench/length_sweep.py --out bench/results/h200
    python bench/length_sweep.py --tiny --out /tmp/ls           # CPU smoke test

Writes OUT/length_sweep.json and prints a table (us per token, and the ratio to the shortest L).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import cases, runner  # noqa: E402


def run_length(L: int, tokens: int, ssm_impl: str, steps: int, tiny: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bst_dist import config
    from bst_dist.models import build

    job = cases.step_job(ssm_impl, max(1, tokens // L), tiny)
    job["model"]["seq_len"] = L
    cfg = config.from_dict(job).model
    B = max(1, tokens // L)
    model = build(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tok = jax.random.randint(jax.random.key(1), (B, L), 0, cfg.vocab_size, jnp.int32)
    cache = model.init_cache(B)
    start = jnp.zeros((B,), bool)

    def fwd(state, tok, cache):  # the backbone and the head's cost without materialising B*L*V logits twice
        h, c = nnx.merge(graphdef, state).features(tok, cache, start)
        return jnp.mean(h.astype(jnp.float32)), c

    compiled = jax.jit(fwd).lower(state, tok, cache).compile()
    t = runner.timed(compiled, (state, tok, cache), steps)
    return {"L": L, "B": B, "ssm_impl": ssm_impl, "ms": t["ms"], "us_per_token": 1e3 * t["ms"] / (B * L)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="4096,16384,65536")
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per call (B = tokens / L)")
    ap.add_argument("--impls", default="chunked,fft")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    if a.tiny:
        lengths, a.tokens = [64, 256], 256
    rows = []
    for impl in a.impls.split(","):
        for L in lengths:
            try:
                r = run_length(L, a.tokens, impl, a.steps, a.tiny)
            except Exception as e:  # noqa: BLE001 -- record the failure (e.g. out of memory), keep going
                r = {"L": L, "ssm_impl": impl, "error": repr(e)[:400]}
            rows.append(r)
            print(r, flush=True)
            runner.write(a.out, "length_sweep", {"tokens_per_call": a.tokens, "rows": rows, "partial": True})
        base = next((r for r in rows if r.get("ssm_impl") == impl and "us_per_token" in r), None)
        for r in rows:
            if base and r.get("ssm_impl") == impl and "us_per_token" in r:
                r["x_shortest"] = r["us_per_token"] / base["us_per_token"]
    path = runner.write(a.out, "length_sweep", {"tokens_per_call": a.tokens, "rows": rows})
    print(f"\n{'impl':8} {'L':>6} {'B':>3} {'ms':>9} {'us/token':>9} {'x shortest':>10}")
    for r in rows:
        if "ms" in r:
            print(f"{r['ssm_impl']:8} {r['L']:6} {r['B']:3} {r['ms']:9.2f} {r['us_per_token']:9.3f} {r['x_shortest']:10.2f}")
        else:
            print(f"{r['ssm_impl']:8} {r['L']:6} ERROR {r['error'][:80]}")
    print("wrote", path)


if __name__ == "__main__":
    main()

"""bf16 against float32 logits of the 400M job's model with the same seeded weights: per-row
||logits_bf16 - logits_f32|| / ||logits_f32|| over B x L positions (a sequence and a carried one).

    python bench/numerics.py --out bench/results/h200
    python bench/numerics.py --tiny --out /tmp/nm               # CPU smoke test

Writes OUT/numerics.json: the median, 99th percentile and max of the per-row relative error for
the first sequence (fresh cache) and the second (the cache carried).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import cases, runner  # noqa: E402


def logits_for(dtype: str, ssm_impl: str, B: int, tiny: bool, toks):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bst_dist import config
    from bst_dist.models import build

    job = cases.step_job(ssm_impl, B, tiny)
    job["model"]["dtype"] = dtype
    if dtype == "float32":  # cuDNN's fused attention is bf16-only: the reference attends through XLA
        job["model"]["attention_impl"] = "xla"
    cfg = config.from_dict(job).model
    model = build(cfg, nnx.Rngs(0))  # parameters are float32 in both: the same weights
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t, c, st: nnx.merge(graphdef, s)(t, c, st))
    cache = model.init_cache(B)
    out = []
    for i, t in enumerate(toks):
        logits, cache = fwd(state, t, cache, jnp.full((B,), i == 0))
        out.append(jax.device_get(logits[..., :cfg.vocab_size].astype(jnp.float32)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impls", default="chunked,fft")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import jax
    import numpy as np
    L = 64 if a.tiny else 4096
    V = 256 if a.tiny else 50257
    keys = jax.random.split(jax.random.key(7), 2)
    toks = [jax.random.randint(k, (a.batch, L), 0, V) for k in keys]
    rows = []
    for impl in a.impls.split(","):
        ref = logits_for("float32", impl, a.batch, a.tiny, toks)
        low = logits_for("bfloat16", impl, a.batch, a.tiny, toks)
        for i, (r, lo) in enumerate(zip(ref, low)):
            rel = np.linalg.norm(lo - r, axis=-1) / np.linalg.norm(r, axis=-1)
            row = {"ssm_impl": impl, "segment": ["fresh cache", "cache carried"][i], "finite": bool(np.isfinite(lo).all()),
                   "rel_median": float(np.median(rel)), "rel_p99": float(np.percentile(rel, 99)), "rel_max": float(rel.max())}
            rows.append(row)
            print(row, flush=True)
    path = runner.write(a.out, "numerics", {"L": L, "B": a.batch, "bound": 1e-2, "rows": rows})
    print(f"\n{'impl':8} {'segment':14} {'median':>9} {'p99':>9} {'max':>9}  (bound 1e-2)")
    for r in rows:
        print(f"{r['ssm_impl']:8} {r['segment']:14} {r['rel_median']:9.2e} {r['rel_p99']:9.2e} {r['rel_max']:9.2e}")
    print("wrote", path)


if __name__ == "__main__":
    main()

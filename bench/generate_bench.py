"""Decoding speed of the 400M job's model (random weights: speed does not depend on them) with the
block state carried: tokens/s per sequence and for a batch, after a prompt prefill, and the state
size after prompts of 1x and 4x the training length (it must not grow).

    python bench/generate_bench.py --out bench/results/h200
    python bench/generate_bench.py --tiny --out /tmp/gb          # CPU smoke test

Writes OUT/generate_bench.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import cases, runner  # noqa: E402


def run(batch: int, tokens: int, tiny: bool, ssm_impl: str) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from bst_dist import config
    from bst_dist.generate.decode import Decoder, state_bytes
    from bst_dist.models import build

    cfg = config.from_dict(cases.step_job(ssm_impl, batch, tiny)).model
    model = build(cfg, nnx.Rngs(0))
    dec = Decoder(model, batch)
    rng = np.random.default_rng(0)
    L = cfg.seq_len
    sizes = {}
    for mult in (1, 4):
        prompt = rng.integers(0, cfg.vocab_size, (batch, mult * L + 3))
        t = time.perf_counter()
        state = jax.block_until_ready(dec.prefill(prompt))
        sizes[mult] = {"state_bytes": state_bytes(state), "prefill_s": time.perf_counter() - t}
    step = dec.make_step(1.0, None, None)
    key = jax.random.key(0)
    for _ in range(3):  # compile and warm up
        key, sub = jax.random.split(key)
        tok, _, state = step(dec.params, state, sub)
    jax.block_until_ready(tok)
    t = time.perf_counter()
    for _ in range(tokens):
        key, sub = jax.random.split(key)
        tok, _, state = step(dec.params, state, sub)
    jax.block_until_ready(tok)
    dt = time.perf_counter() - t
    return {"batch": batch, "S": dec.S, "tokens": tokens, "ms_per_step": 1e3 * dt / tokens,
            "tokens_per_s_per_seq": tokens / dt, "tokens_per_s": batch * tokens / dt,
            "state_bytes_after_L": sizes[1]["state_bytes"], "state_bytes_after_4L": sizes[4]["state_bytes"],
            "prefill_4L_s": sizes[4]["prefill_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=256, help="decoded tokens timed per batch size")
    ap.add_argument("--ssm-impl", default="fft")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = []
    for b in [int(x) for x in a.batches.split(",")]:
        try:
            r = run(b, 16 if a.tiny else a.tokens, a.tiny, a.ssm_impl)
        except Exception as e:  # noqa: BLE001 -- record the failure, keep measuring the rest
            r = {"batch": b, "error": repr(e)[:400]}
        rows.append(r)
        print(r, flush=True)
    path = runner.write(a.out, "generate_bench", {"ssm_impl": a.ssm_impl, "rows": rows})
    print(f"\n{'batch':>5} {'S':>5} {'ms/step':>8} {'tok/s/seq':>10} {'tok/s':>8} {'state MiB (L, 4L)':>18}")
    for r in rows:
        if "ms_per_step" in r:
            print(f"{r['batch']:5} {r['S']:5} {r['ms_per_step']:8.2f} {r['tokens_per_s_per_seq']:10.1f} "
                  f"{r['tokens_per_s']:8.1f} {r['state_bytes_after_L'] / 2**20:8.2f} {r['state_bytes_after_4L'] / 2**20:8.2f}")
        else:
            print(f"{r['batch']:5} ERROR {r['error'][:80]}")
    print("wrote", path)


if __name__ == "__main__":
    main()

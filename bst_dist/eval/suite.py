"""The quality study's evaluation of one trained run (docs/quality.md), on a held-out split:

  fresh      perplexity at the training length L, a fresh cache for every sequence
  carried    the same sequences with the cache carried through each document, in order: the
             streamed (training) mode, whose numbers StreamEvaluator gives too (tested), so it
             is not run a second time
  at_length  the same windows of max(lengths) tokens at every T in `lengths`, cut into T-long
             rows each scored from a fresh cache (length generalisation, like with like)

fresh and carried also give perplexity per position bucket within the sequence and within the
document (eval/sequences.py). The parameters alone are restored (no optimizer)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from bst_dist import parallel

DEFAULT_LENGTHS = (512, 4096, 16384, 65536)


@dataclass(frozen=True)
class EvalSpec:
    split: str = "test"
    max_batches: int = 0  # fresh/carried/streamed: L-long steps of the document lanes (0: the whole split)
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    max_docs: int = 0  # at_length: first N documents (0: all)
    max_windows: int = 4  # at_length: windows of max(lengths) tokens per document (0: all)
    length_tokens: int = 32768  # at_length: about this many tokens per batch (the logits are V floats a token)
    batch_size: int = 0  # fresh/carried/streamed rows per step (0: the job's global batch)


def evaluate_params(setup, params, spec: EvalSpec) -> dict:
    from bst_dist.eval.evaluators import eval_at_length
    from bst_dist.eval.sequences import length_batch, sequence_eval

    B = spec.batch_size or None
    out, times = {"split": spec.split}, {}
    for name, carry in (("fresh", False), ("carried", True)):
        t0 = time.perf_counter()
        out[name] = sequence_eval(setup, params, split=spec.split, carry=carry, max_batches=spec.max_batches,
                                  batch_size=B)
        times[name] = time.perf_counter() - t0
    n = parallel.batch_axis_size(setup.mesh, setup.rules)
    out["at_length"] = []
    for T in spec.lengths:
        t0 = time.perf_counter()
        r = eval_at_length(setup, params, T, split=spec.split, window=max(spec.lengths), max_windows=spec.max_windows,
                           max_docs=spec.max_docs, batch_size=length_batch(T, n, spec.length_tokens))
        out["at_length"].append(r)
        times[f"at_length_{T}"] = time.perf_counter() - t0
    out["seconds"] = times
    return _json_safe(out)


def evaluate_checkpoint(cfg, spec: EvalSpec) -> dict:
    """Evaluate the newest checkpoint of `cfg`'s run: its parameters alone (the generate path's
    partial Orbax restore: no optimizer state is read), placed in the job's shardings."""
    import jax
    from flax import nnx

    from bst_dist.generate.params import read_source
    from bst_dist.train.state import plan

    setup, abstract, _ = plan(cfg, parallel.make_mesh(cfg.mesh), optimizer=False)
    _, pure, info = read_source(cfg.train.run_dir)
    params = abstract["params"]
    nnx.replace_by_pure_dict(params, pure)
    params = jax.device_put(params, setup.state_shardings["params"])
    return {"step": info["step"], **evaluate_params(setup, params, spec)}


def _json_safe(x):
    """NaN/inf (a bucket with no tokens) -> None: strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x

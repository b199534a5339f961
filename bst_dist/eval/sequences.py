"""Perplexity over the L-long training sequences of a split, per position bucket, with the cache
either fresh for every sequence or carried from the previous sequence of the document.

* fresh (carry=False): every L-token sequence starts from a zero cache, as if it were the whole
  context (the BST paper's "perplexity at the training length");
* carried (carry=True): documents read in order with the cache carried, as in training and in
  `StreamEvaluator`, whose overall numbers it reproduces.

Both count, beside the total, the nats per position bucket within the sequence (buckets of
`bucket` tokens, W by default: what the first block loses without a carried cache shows here)
and per position within the document (evaluators.BUCKET_EDGES). They compute on the training
mesh and reduce on device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bst_dist.eval.evaluators import BUCKET_EDGES, BUCKET_NAMES, _ppl
from bst_dist.train.state import Setup


def _buckets(names, nats, toks) -> list[dict]:
    return [{"bucket": name, "tokens": int(t), "loss": float(n / t) if t else float("nan"), "ppl": _ppl(n, t)}
            for name, n, t in zip(names, nats, toks)]


def sequence_eval(setup: Setup, params, *, split: str = "validation", carry: bool = False, max_batches: int = 0,
                  batch_size: int | None = None, bucket: int | None = None) -> dict:
    """Perplexity of the split's L-long sequences (the first `max_batches` steps of the document
    lanes; 0: the whole split), fresh or carried cache; per bucket within the sequence and the
    document."""
    from data_pipelines import make_loader

    from bst_dist.models import cache_shape
    from bst_dist.parallel import batch_sharding, cache_shardings

    cfg = setup.cfg
    L = cfg.model.seq_len
    size = bucket or cfg.model.block_len
    nb = -(-L // size)
    B = batch_size or cfg.train.global_batch_size
    graphdef = setup.graphdef
    row2, row1 = batch_sharding(setup.mesh, 2, setup.rules), batch_sharding(setup.mesh, 1, setup.rules)
    shapes = cache_shape(cfg.model, B)
    cache_sh = cache_shardings(shapes, setup.mesh, setup.rules)
    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
    n_doc = len(BUCKET_NAMES)

    def step(params, cache, inputs, targets, mask, doc_start, doc_bucket):
        model = nnx.merge(graphdef, params)
        if not carry:  # a zero cache and a document start in every row: nothing crosses sequences
            cache = jax.lax.with_sharding_constraint(zeros(), cache_sh)
            doc_start = jnp.ones_like(doc_start)
        x, cache = model.features(inputs, cache, doc_start)
        logits = model.logits(x).astype(jnp.float32)
        nats = (jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]) * mask
        pad = nb * size - L
        by_pos = lambda v: jnp.pad(v.sum(0), (0, pad)).reshape(nb, size).sum(-1)  # noqa: E731
        one_hot = jax.nn.one_hot(doc_bucket, n_doc, dtype=jnp.float32)
        return (cache, by_pos(nats), by_pos(mask), jnp.einsum("bt,btk->k", nats, one_hot),
                jnp.einsum("bt,btk->k", mask, one_hot))

    step = jax.jit(step, donate_argnums=(1,) if carry else ())
    cache = jax.jit(zeros, out_shardings=cache_sh)()
    seq_n, seq_t = np.zeros(nb), np.zeros(nb)
    doc_n, doc_t = np.zeros(n_doc), np.zeros(n_doc)
    loader = make_loader(cfg.data, seq_len=L, global_batch_size=B, process_index=jax.process_index(),
                         process_count=jax.process_count(), split=split, seed=cfg.train.seed, num_epochs=1)
    batches = 0
    try:
        for i, local in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            pos = np.maximum(local["seq_index"], 0)[:, None] * L + np.arange(L)[None]
            doc_bucket = np.searchsorted(BUCKET_EDGES, pos, side="right").astype(np.int32)
            g = lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x))  # noqa: E731
            cache, sn, st, dn, dt = step(params, cache, g(local["inputs"], row2), g(local["targets"], row2),
                                         g(local["loss_mask"], row2), g(local["doc_start"], row1),
                                         g(doc_bucket, row2))
            sn, st, dn, dt = jax.device_get((sn, st, dn, dt))
            seq_n, seq_t, doc_n, doc_t = seq_n + sn, seq_t + st, doc_n + dn, doc_t + dt
            batches += 1
    finally:
        loader.close()
    total_n, total_t = float(seq_n.sum()), float(seq_t.sum())
    names = [f"{k * size}-{min((k + 1) * size, L)}" for k in range(nb)]
    return {"mode": "carried" if carry else "fresh", "split": split, "L": L, "batches": batches,
            "tokens": int(total_t), "loss": total_n / max(total_t, 1), "ppl": _ppl(total_n, total_t),
            "seq_buckets": _buckets(names, seq_n, seq_t),
            "doc_buckets": [b for b in _buckets(BUCKET_NAMES, doc_n, doc_t) if b["tokens"]]}


def length_batch(T: int, data_parallel: int, tokens_per_batch: int) -> int:
    """Rows per at-length batch: about `tokens_per_batch` tokens (the logits of a 65k-token row
    alone are V x 65k floats), a multiple of the data-parallel size, at least one per device."""
    rows = max(1, tokens_per_batch // max(T, 1)) // data_parallel * data_parallel
    return max(data_parallel, rows)


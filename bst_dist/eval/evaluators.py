"""Evaluation in the two modes of docs/training.md ("Evaluation").

* streamed: documents cut into L-long sequences read in order with the evaluation's own cache
  (separate from training's), as in training; perplexity overall and per position bucket within
  the document (0-4k, 4k-16k, 16k-65k, 65k+).
* at length T: each document's first T tokens in one pass with a fresh cache (the BST paper's
  length-generalisation protocol); T is rounded up to a multiple of W with the padding masked;
  unstructured filters are evaluated on the training grid (tap k at k/L) out to length T
  (docs/model_spec.md).
Both compute on the training mesh and reduce on device, so several processes can run them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bst_dist.models import Cache
from bst_dist.train.batch import Batch
from bst_dist.train.state import Setup

BUCKET_EDGES = (4096, 16384, 65536)
BUCKET_NAMES = ("0-4k", "4k-16k", "16k-65k", "65k+")


def _ppl(nats: float, tokens: float) -> float:
    return math.exp(min(nats / tokens, 50.0)) if tokens else float("nan")


def _local_rows(x: np.ndarray) -> np.ndarray:
    """This process's rows [p*B/P, (p+1)*B/P) of a global host array."""
    P, p = jax.process_count(), jax.process_index()
    n = x.shape[0] // P
    return x[p * n:(p + 1) * n]


class StreamEvaluator:
    """Streamed evaluation over a split, the first `max_batches` steps (0: the whole split)."""

    def __init__(self, setup: Setup, split: str = "validation", max_batches: int = 0, batch_size: int | None = None):
        self.setup, self.split, self.max_batches = setup, split, max_batches
        cfg = setup.cfg
        self.B = batch_size or cfg.train.global_batch_size
        graphdef = setup.graphdef
        from bst_dist.parallel import batch_sharding

        self.row2 = batch_sharding(setup.mesh, 2, setup.rules)
        self.row1 = batch_sharding(setup.mesh, 1, setup.rules)
        nb = len(BUCKET_NAMES)

        def step(params, cache, batch: Batch, bucket):
            model = nnx.merge(graphdef, params)
            nll, cache = model.token_nll(batch.inputs, batch.targets, cache, batch.doc_start)
            nats = nll * batch.loss_mask
            one_hot = jax.nn.one_hot(bucket, nb, dtype=jnp.float32)
            return cache, jnp.einsum("bt,btk->k", nats, one_hot), jnp.einsum("bt,btk->k", batch.loss_mask, one_hot)

        self._step = jax.jit(step, donate_argnums=(1,))

    def run(self, params) -> dict:
        from data_pipelines import make_loader

        cfg = self.setup.cfg
        L = cfg.model.seq_len
        from bst_dist.parallel import cache_shardings

        shardings = cache_shardings(Cache.spec(cfg.model, self.B), self.setup.mesh, self.setup.rules)
        cache = Cache.zeros(cfg.model, self.B, sharding=shardings)
        nats = np.zeros(len(BUCKET_NAMES))
        toks = np.zeros(len(BUCKET_NAMES))
        loader = make_loader(cfg.data, seq_len=L, global_batch_size=self.B, process_index=jax.process_index(),
                             process_count=jax.process_count(), split=self.split, seed=cfg.train.seed, num_epochs=1)
        try:
            for i, local in enumerate(loader):
                if self.max_batches and i >= self.max_batches:
                    break
                pos = np.maximum(local["seq_index"], 0)[:, None] * L + np.arange(L)[None]
                bucket = np.searchsorted(BUCKET_EDGES, pos, side="right").astype(np.int32)
                g = lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x))  # noqa: E731
                batch = Batch.of(local, lambda k, x: g(x, self.row1 if Batch.ndim(k) == 1 else self.row2))
                cache, n, t = self._step(params, cache, batch, g(bucket, self.row2))
                nats += np.asarray(jax.device_get(n))
                toks += np.asarray(jax.device_get(t))
        finally:
            loader.close()
        out = {"eval_loss": float(nats.sum() / max(toks.sum(), 1)), "eval_ppl": _ppl(nats.sum(), toks.sum()),
               "eval_tokens": int(toks.sum())}
        for name, n, t in zip(BUCKET_NAMES, nats, toks):
            if t:
                out[f"eval_ppl_{name}"] = _ppl(n, t)
        return out


def _rows(setup: Setup, ndim: int):
    from bst_dist.parallel import batch_sharding

    return batch_sharding(setup.mesh, ndim, setup.rules)


def eval_at_length(setup: Setup, params, T: int, split: str = "validation", max_docs: int = 0,
                   batch_size: int | None = None) -> dict:
    """Perplexity of each document's first T tokens in one pass (fresh cache, no carry)."""
    from data_pipelines import ensure_prepared, iter_documents

    cfg = setup.cfg
    W = cfg.model.block_len
    Tp = -(-T // W) * W
    B = batch_size or cfg.train.global_batch_size
    graphdef = setup.graphdef
    cache_sh = jax.tree.map(lambda s: _rows(setup, len(s.shape)), Cache.spec(cfg.model, B, Tp))

    @jax.jit
    def nll(params, batch: Batch):
        model = nnx.merge(graphdef, params)
        cache = Cache.zeros(cfg.model, B, Tp, sharding=cache_sh)
        nats, count, _ = model.loss(batch.inputs, batch.targets, batch.loss_mask, cache, batch.doc_start)
        return nats, count

    nats = toks = 0.0
    docs = 0
    rows: list[np.ndarray] = []

    def flush():
        nonlocal nats, toks
        if not rows:
            return
        arr = np.zeros((B, Tp + 1), np.int32)
        mask = np.zeros((B, Tp), np.float32)
        for i, r in enumerate(rows):
            arr[i, :len(r)] = r
            mask[i, :len(r) - 1] = 1.0
        g = lambda x, s: jax.make_array_from_process_local_data(s, _local_rows(x))  # noqa: E731
        fields = {"inputs": arr[:, :-1], "targets": arr[:, 1:], "loss_mask": mask,
                  "doc_start": np.ones((B,), bool)}  # one pass from a fresh cache: every row starts
        n, t = nll(params, Batch.of(fields, lambda k, x: g(x, _rows(setup, Batch.ndim(k)))))
        nats += float(n)
        toks += float(t)
        rows.clear()

    for _, tokens in iter_documents(ensure_prepared(cfg.data), split):
        rows.append(np.asarray(tokens[:T + 1], np.int32))
        docs += 1
        if len(rows) == B:
            flush()
        if max_docs and docs >= max_docs:
            break
    flush()
    return {"T": T, "T_padded": Tp, "documents": docs, "tokens": int(toks), "loss": nats / max(toks, 1),
            "ppl": _ppl(nats, toks)}

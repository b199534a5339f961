"""Evaluation in the two modes of docs/training.md ("Evaluation").

* streamed: documents cut into L-long sequences read in order with the evaluation's own cache
  (separate from training's), as in training; perplexity overall and per position bucket within
  the document (0-4k, 4k-16k, 16k-65k, 65k+).
* at length T: the same windows of text at every T, cut into T-long rows each scored in one pass
  with a fresh cache (the BST paper's length-generalisation protocol, like with like across T);
  a row is rounded up to a multiple of W with the padding masked;
  unstructured filters are evaluated on the training grid (tap k at k/L) out to length T
  (docs/model_spec.md).
Both compute on the training mesh and reduce on device, so several processes can run them.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bst_dist.models import Cache
from bst_dist.train.batch import Batch
from bst_dist.train.state import Setup

log = logging.getLogger("bst_dist.eval")

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
                if (i + 1) % 100 == 0:
                    log.info("streamed: %d batches, %d tokens", i + 1, int(toks.sum()))
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


def length_windows(docs, window: int, max_windows: int = 0, max_docs: int = 0):
    """The scored text of the length protocol: the first `max_windows` (0: all) non-overlapping
    windows of `window` + 1 tokens of each of the first `max_docs` (0: all) documents. A document
    shorter than one window gives none. Yields (document index, window)."""
    for d, (_, tokens) in enumerate(docs):
        if max_docs and d >= max_docs:
            break
        n = (len(tokens) - 1) // window
        for w in range(min(n, max_windows) if max_windows else n):
            yield d, np.asarray(tokens[w * window:(w + 1) * window + 1], np.int32)


def eval_at_length(setup: Setup, params, T: int, split: str = "validation", window: int | None = None,
                   max_windows: int = 0, max_docs: int = 0, batch_size: int | None = None) -> dict:
    """Perplexity of the same text at every evaluation length T: the `length_windows` of `window`
    tokens (T when None), each cut into rows of T tokens (the last row shorter when T does not
    divide the window), every row scored in one pass from a fresh cache. At every T each token of
    the windows is scored once, with the T-row's earlier tokens (at most T) as its context, so
    the perplexities of several T compare like with like (the BST paper's length-generalisation
    figure): a model that uses longer context scores lower at larger T."""
    from data_pipelines import ensure_prepared, iter_documents

    cfg = setup.cfg
    W = cfg.model.block_len
    window = window or T
    Tp = -(-min(T, window) // W) * W
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
    docs, windows = set(), 0
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

    for d, w in length_windows(iter_documents(ensure_prepared(cfg.data), split), window, max_windows, max_docs):
        docs.add(d)
        windows += 1
        for s in range(0, window, T):  # rows overlap by one token: a row's last target is the next one's first input
            rows.append(w[s:s + T + 1])
            if len(rows) == B:
                flush()
    flush()
    return {"T": T, "T_padded": Tp, "window": window, "windows": windows, "documents": len(docs),
            "tokens": int(toks), "loss": nats / max(toks, 1), "ppl": _ppl(nats, toks)}

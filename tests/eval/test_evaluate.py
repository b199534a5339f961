"""Evaluation equals a naive reference: streamed (documents in order with the cache carried,
perplexity per position bucket) and at length T (the same windows at every T, cut into T-long rows, one
pass each from a fresh cache, rows rounded up to W)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bst_dist import config, parallel
from bst_dist.eval.evaluators import StreamEvaluator, eval_at_length
from bst_dist.train import state as state_lib

from tests.helpers.models import naive_nll as token_nll
from tests.helpers.tiny import TINY_JOB



@pytest.fixture(scope="module")
def setup_and_params():
    cfg = config.from_dict(TINY_JOB)
    setup, state, _ = state_lib.create(cfg, parallel.make_mesh(cfg.mesh))
    return setup, state["params"]


def naive_nll(model, inputs, targets, mask, cache, doc_start):
    logits, cache = model(jnp.asarray(inputs), cache, jnp.asarray(doc_start))
    nats = token_nll(logits, targets) * jnp.asarray(mask)
    return float(nats.sum()), float(np.sum(mask)), cache


def test_streamed_equals_naive_loop(setup_and_params):
    from data_pipelines import make_loader

    setup, params = setup_and_params
    cfg = setup.cfg
    got = StreamEvaluator(setup, split="validation", max_batches=3).run(params)
    model = nnx.merge(setup.graphdef, jax.device_get(params))
    cache = model.init_cache(8)
    nats = toks = 0.0
    loader = make_loader(cfg.data, seq_len=64, global_batch_size=8, split="validation", num_epochs=1)
    for _, b in zip(range(3), loader):
        n, t, cache = naive_nll(model, b["inputs"], b["targets"], b["loss_mask"], cache, b["doc_start"])
        nats, toks = nats + n, toks + t
    loader.close()
    assert got["eval_tokens"] == toks
    assert got["eval_loss"] == pytest.approx(nats / toks, rel=1e-5)
    assert got["eval_ppl_0-4k"] == pytest.approx(math.exp(nats / toks), rel=1e-4)  # 3 x 64 tokens: all < 4k


@pytest.mark.parametrize("T", [100, pytest.param(32, marks=pytest.mark.slow)])  # 32: rows shorter than the window
def test_at_length_equals_naive_and_pads_to_w(setup_and_params, T):
    """Windows of 100 tokens of the first 3 documents (those that have one), cut into T-long rows
    (T=32: three rows of 32 and one of 4), each row one pass from a fresh cache, padded to W=16."""
    from data_pipelines import ensure_prepared, iter_documents

    setup, params = setup_and_params
    got = eval_at_length(setup, params, T, split="validation", window=100, max_windows=2, max_docs=3)
    assert got["T_padded"] == -(-T // 16) * 16 and got["window"] == 100
    model = nnx.merge(setup.graphdef, jax.device_get(params))
    nats = toks = 0.0
    docs = windows = 0
    for _, (_, doc) in zip(range(3), iter_documents(ensure_prepared(setup.cfg.data), "validation")):
        docs += len(doc) >= 101  # a document shorter than one window gives none
        for w in range(min((len(doc) - 1) // 100, 2)):
            windows += 1
            for s in range(0, 100, T):
                row = doc[w * 100 + s:w * 100 + min(s + T, 100) + 1]
                Tp = got["T_padded"]
                x = np.zeros((1, Tp + 1), np.int32)
                x[0, :len(row)] = row
                mask = np.zeros((1, Tp), np.float32)
                mask[0, :len(row) - 1] = 1
                n, t, _ = naive_nll(model, x[:, :-1], x[:, 1:], mask, model.init_cache(1), np.ones((1,), bool))
                nats, toks = nats + n, toks + t
    assert got["documents"] == docs > 0 and got["windows"] == windows
    assert got["tokens"] == toks == 100 * windows
    assert got["loss"] == pytest.approx(nats / toks, rel=1e-5)

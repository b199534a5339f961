"""The study's evaluation against naive references on a tiny model: fresh-cache perplexity per
sequence-position bucket equals a plain loop calling the model with a new cache per sequence; the
carried mode reproduces StreamEvaluator; at-length results do not depend on the batch size the
token budget picks, and score the same tokens at every T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bst_dist import config, parallel
from bst_dist.eval.evaluators import StreamEvaluator, eval_at_length
from bst_dist.eval.sequences import length_batch
from bst_dist.eval.suite import EvalSpec, evaluate_params
from bst_dist.train import state as state_lib

from tests.helpers.tiny import job_dict



# Block layers only (the XL cache is what carries): the cheapest model whose cache matters.
JOB = job_dict(model={"num_layers": 2, "bst_layers": [], "brect_layers": []})
SPEC = EvalSpec(split="validation", max_batches=3, lengths=(32, 100), max_docs=5, length_tokens=1600)


@pytest.fixture(scope="module")
def evaluated():
    cfg = config.from_dict(JOB)
    setup, state, _ = state_lib.create(cfg, parallel.make_mesh(cfg.mesh))
    return setup, state["params"], evaluate_params(setup, state["params"], SPEC)


def test_fresh_equals_naive_new_cache_per_sequence(evaluated):
    from data_pipelines import make_loader

    setup, params, result = evaluated
    got = result["fresh"]
    graphdef = setup.graphdef

    @jax.jit  # the model's public call on one batch, a new cache for it
    def forward(params, inputs):
        model = nnx.merge(graphdef, params)
        return model(inputs, model.init_cache(8), jnp.ones((8,), bool))[0]

    params = jax.device_get(params)
    W, L = 16, 64
    nats, toks = np.zeros(L // W), np.zeros(L // W)
    loader = make_loader(setup.cfg.data, seq_len=L, global_batch_size=8, split="validation", num_epochs=1)
    for _, b in zip(range(3), loader):
        logits = forward(params, jnp.asarray(b["inputs"]))
        lp = jax.nn.log_softmax(logits, -1)
        n = -np.asarray(jnp.take_along_axis(lp, jnp.asarray(b["targets"])[..., None], -1)[..., 0]) * b["loss_mask"]
        nats += n.sum(0).reshape(L // W, W).sum(-1)
        toks += b["loss_mask"].sum(0).reshape(L // W, W).sum(-1)
    loader.close()
    assert got["mode"] == "fresh" and got["batches"] == 3 and got["tokens"] == toks.sum()
    assert got["loss"] == pytest.approx(nats.sum() / toks.sum(), rel=1e-5)
    assert [b["bucket"] for b in got["seq_buckets"]] == ["0-16", "16-32", "32-48", "48-64"]
    for b, n, t in zip(got["seq_buckets"], nats, toks):
        assert b["tokens"] == t and b["loss"] == pytest.approx(n / t, rel=1e-5)


def test_carried_reproduces_stream_evaluator_and_differs_from_fresh(evaluated):
    """carried is the streamed (training) mode: the suite does not run StreamEvaluator again."""
    setup, params, result = evaluated
    assert "streamed" not in result
    stream = StreamEvaluator(setup, split=SPEC.split, max_batches=SPEC.max_batches).run(params)
    carried, fresh = result["carried"], result["fresh"]
    assert carried["tokens"] == stream["eval_tokens"] == fresh["tokens"]
    assert carried["loss"] == pytest.approx(stream["eval_loss"], rel=1e-5)
    assert carried["doc_buckets"][0]["bucket"] == "0-4k"
    assert carried["doc_buckets"][0]["ppl"] == pytest.approx(stream["eval_ppl_0-4k"], rel=1e-4)
    # the first sequence of a lane starts its document (same numbers either way); the later
    # sequences of a document see the carried keys/values
    assert carried["seq_buckets"][0]["loss"] != fresh["seq_buckets"][0]["loss"]


def test_length_batch_budget():
    assert length_batch(65536, 1, 65536) == 1
    assert length_batch(512, 1, 65536) == 128
    assert length_batch(65536, 8, 65536) == 8  # at least one row per device
    assert length_batch(1000, 8, 65536) == 64  # a multiple of the data-parallel size


def test_at_length_independent_of_the_batch_the_budget_picks(evaluated):
    setup, params, result = evaluated
    assert [r["T"] for r in result["at_length"]] == [32, 100]
    r = result["at_length"][1]  # length_batch(100, 8, 1600) = 16 rows; the reference runs 8
    ref = eval_at_length(setup, params, 100, split="validation", window=100, max_windows=SPEC.max_windows,
                         max_docs=5, batch_size=8)
    assert r["documents"] == ref["documents"] > 0 and r["tokens"] == ref["tokens"] > 0
    assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_at_length_scores_the_same_tokens_at_every_T(evaluated):
    _, _, result = evaluated
    a32, a100 = result["at_length"]
    assert a32["window"] == a100["window"] == 100 and a32["windows"] == a100["windows"] > 0
    assert a32["tokens"] == a100["tokens"] == 100 * a100["windows"]

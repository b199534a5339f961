"""The output head's chunked cross-entropy (models/loss.py) equals the naive one over
materialised logits, value and gradients, in float32 and bfloat16; the model's loss methods
equal the naive loss over the model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bst_dist.models import build, loss

from tests.helpers.models import naive_nll, tiny_cfg, tokens



def _naive_sum(x, embed, targets, mask, vocab_size):
    V, d = embed.shape
    logits = jnp.einsum("btd,vd->btv", x, embed.astype(x.dtype), preferred_element_type=jnp.float32) / np.sqrt(d)
    logits = jnp.where(jnp.arange(V) < vocab_size, logits, -1e9)
    return jnp.sum(naive_nll(logits, targets) * mask)


@pytest.mark.parametrize("dtype,chunk,tol", [(jnp.float32, 16, 1e-5), (jnp.float32, 7, 1e-5), (jnp.bfloat16, 32, 2e-2)])
def test_chunked_equals_naive(dtype, chunk, tol):
    rng = np.random.default_rng(0)
    B, T, d, vocab, V = 2, 48, 32, 250, 256
    x = jnp.asarray(rng.normal(size=(B, T, d)), dtype)
    embed = jnp.asarray(rng.normal(size=(V, d)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, size=(B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) < 0.8, jnp.float32)
    f_naive = lambda x, e: _naive_sum(x, e, targets, mask, vocab)
    f_chunk = lambda x, e: loss.masked_nll_sum(x, e, targets, mask, vocab_size=vocab, chunk=chunk)
    v0, (gx0, ge0) = jax.value_and_grad(f_naive, argnums=(0, 1))(x, embed)
    v1, (gx1, ge1) = jax.jit(jax.value_and_grad(f_chunk, argnums=(0, 1)))(x, embed)
    assert gx1.dtype == x.dtype and ge1.dtype == jnp.float32
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5 if dtype == jnp.float32 else 1e-3)
    for a, b in ((gx1, gx0), (ge1, ge0)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < tol
    # the per-token form is the same numbers before the masked sum
    nll = loss.token_nll(x, embed, targets, vocab_size=vocab, chunk=chunk)
    np.testing.assert_allclose(float(jnp.sum(nll * mask)), float(v1), rtol=1e-5)


def test_model_loss_methods_equal_naive_over_logits():
    cfg = tiny_cfg(vocab_size=60)  # padded to 128: the padded ids must not count
    model = build(cfg, nnx.Rngs(0))
    B, T = 2, cfg.seq_len
    x = tokens(1, B, T + 1, vocab=60)
    mask = jnp.asarray(np.random.default_rng(2).random((B, T)) < 0.7, jnp.float32)
    start = jnp.ones((B,), bool)
    logits, c_ref = model(x[:, :-1], model.init_cache(B), start)
    want = naive_nll(logits, x[:, 1:])
    nats, count, c1 = model.loss(x[:, :-1], x[:, 1:], mask, model.init_cache(B), start, chunk=16)
    nll, c2 = model.token_nll(x[:, :-1], x[:, 1:], model.init_cache(B), start, chunk=16)
    np.testing.assert_allclose(float(nats), float(jnp.sum(want * mask)), rtol=1e-5)
    assert float(count) == float(mask.sum())
    np.testing.assert_allclose(np.asarray(nll), np.asarray(want), rtol=1e-5, atol=1e-5)
    for a, b, c in zip(jax.tree.leaves(c_ref), jax.tree.leaves(c1), jax.tree.leaves(c2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))

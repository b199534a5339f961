"""The chunked output-head cross-entropy equals the plain one (logits materialised), value and
gradients, in float32 and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bst_dist.config import ModelConfig
from bst_dist.models.lm import LM
from bst_dist.train.chunked_loss import chunked_cross_entropy
from bst_dist.train.step import cross_entropy


def _plain(x, embed, targets, mask, vocab_size):
    V, d = embed.shape
    logits = jnp.einsum("btd,vd->btv", x, embed.astype(x.dtype), preferred_element_type=jnp.float32) / np.sqrt(d)
    logits = jnp.where(jnp.arange(V) < vocab_size, logits, -1e9)
    return cross_entropy(logits, targets, mask)


@pytest.mark.parametrize("dtype,chunk,tol", [(jnp.float32, 16, 1e-5), (jnp.float32, 7, 1e-5), (jnp.bfloat16, 32, 2e-2)])
def test_chunked_equals_plain(dtype, chunk, tol):
    rng = np.random.default_rng(0)
    B, T, d, vocab, V = 2, 48, 32, 250, 256
    x = jnp.asarray(rng.normal(size=(B, T, d)), dtype)
    embed = jnp.asarray(rng.normal(size=(V, d)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, size=(B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) < 0.8, jnp.float32)
    f_plain = lambda x, e: _plain(x, e, targets, mask, vocab)
    f_chunk = lambda x, e: chunked_cross_entropy(x, e, targets, mask, vocab_size=vocab, chunk=chunk)
    v0, (gx0, ge0) = jax.value_and_grad(f_plain, argnums=(0, 1))(x, embed)
    v1, (gx1, ge1) = jax.jit(jax.value_and_grad(f_chunk, argnums=(0, 1)))(x, embed)
    assert gx1.dtype == x.dtype and ge1.dtype == jnp.float32
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5 if dtype == jnp.float32 else 1e-3)
    for a, b in ((gx1, gx0), (ge1, ge0)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < tol


def test_matches_model_head():
    cfg = ModelConfig(vocab_size=300, d_model=16, num_layers=1, num_heads=2, head_dim=8, mlp_dim=32,
                      block_len=8, seq_len=16, dtype="float32")
    model = LM(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 16, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 300, size=(2, 16)), jnp.int32)
    mask = jnp.ones((2, 16), jnp.float32)
    want = cross_entropy(model.logits(x), targets, mask)
    got = chunked_cross_entropy(x, model.embed[...], targets, mask, vocab_size=cfg.vocab_size, chunk=8)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)

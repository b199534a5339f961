"""The cross-sequence cache is exact: two consecutive L-long sequences with the cache carried give
the logits of one pass over the 2L concatenation (S4D BST in SH/MH/MF, the Block Transformer and
BRecT layers in the same stack, and Transformer-XL with W = L); doc_start equals a fresh cache."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bst_dist.models import build

from tests.helpers.models import compiled_forward, tiny_cfg, tokens

CASES = {
    "bst_SH_s4d+block+brect": dict(bst={"variant": "SH"}),
    "bst_MH_s4d+block+brect_lstm_dual": dict(bst={"variant": "MH"}, brect={"gate": "lstm", "skip": False}),
    "bst_MF_s4d+block+brect": dict(bst={"variant": "MF"}),
    "bst_SH_s4d_strict": dict(bst={"variant": "SH"}, mask="strict"),
    "transformer_xl": dict(block_len=32, seq_len=32, bst_layers=[], brect_layers=[]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_sequences_with_cache_equal_one_long_pass(case):
    cfg = tiny_cfg(**CASES[case])
    model = build(cfg, nnx.Rngs(3))
    fwd = compiled_forward(model)
    B, L = 2, cfg.seq_len
    x = tokens(7, B, 2 * L)
    start = jnp.ones((B,), bool)
    full, _ = fwd(x, model.init_cache(B), start)
    first, cache = fwd(x[:, :L], model.init_cache(B), start)
    second, _ = fwd(x[:, L:], cache, ~start)
    np.testing.assert_allclose(np.asarray(first), np.asarray(full[:, :L]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(second), np.asarray(full[:, L:]), rtol=1e-4, atol=1e-4)
    # the carry matters: without it the second sequence differs
    alone, _ = fwd(x[:, L:], model.init_cache(B), start)
    assert not np.allclose(np.asarray(alone), np.asarray(full[:, L:]), atol=1e-3)


@pytest.mark.parametrize("variant,kernel", [("MF", "s4d"), ("SH", "unstruct")])
def test_doc_start_equals_fresh_cache(variant, kernel):
    cfg = tiny_cfg(bst={"variant": variant, "kernel": kernel})
    model = build(cfg, nnx.Rngs(4))
    fwd = compiled_forward(model)
    B, L = 2, cfg.seq_len
    _, cache = fwd(tokens(1, B, L), model.init_cache(B), jnp.ones((B,), bool))
    seq = tokens(2, B, L)
    reset, _ = fwd(seq, cache, jnp.array([True, False]))
    fresh, _ = fwd(seq, model.init_cache(B), jnp.ones((B,), bool))
    carried, _ = fwd(seq, cache, jnp.zeros((B,), bool))
    np.testing.assert_allclose(np.asarray(reset[0]), np.asarray(fresh[0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(reset[1]), np.asarray(carried[1]), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(reset[1]), np.asarray(fresh[1]), atol=1e-4)


def test_cache_is_not_differentiable():
    """Gradients of the second sequence's loss do not flow into the first sequence's cache."""
    cfg = tiny_cfg()
    model = build(cfg, nnx.Rngs(5))
    B, L = 2, cfg.seq_len
    _, cache = model(tokens(1, B, L), model.init_cache(B), jnp.ones((B,), bool))

    def loss(cache):
        logits, _ = model(tokens(2, B, L), cache, jnp.zeros((B,), bool))
        return jnp.mean(logits ** 2)

    grads = jax.grad(loss, allow_int=True)(cache)
    for g in jax.tree.leaves(grads):
        if jnp.issubdtype(g.dtype, jnp.floating):
            assert float(jnp.abs(g).max()) == 0.0


def test_no_carry_means_no_carry_for_mf():
    """bst.carry=false with xl_cache=false (and no BRecT layer, whose state is its recurrence):
    nothing crosses sequences, so a used and a fresh cache give the same logits from position 0."""
    for kernel in ("s4d", "unstruct"):
        cfg = tiny_cfg(bst={"variant": "MF", "kernel": kernel, "carry": False}, xl_cache=False, brect_layers=[])
        model = build(cfg, nnx.Rngs(6))
        fwd = compiled_forward(model)
        B, L = 2, cfg.seq_len
        _, used = fwd(tokens(1, B, L), model.init_cache(B), jnp.ones((B,), bool))
        seq = tokens(2, B, L)
        carried, _ = fwd(seq, used, jnp.zeros((B,), bool))
        fresh, _ = fwd(seq, model.init_cache(B), jnp.ones((B,), bool))
        np.testing.assert_array_equal(np.asarray(carried), np.asarray(fresh))

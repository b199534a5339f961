"""The unstructured (implicit) filter of BST layers: taps are defined on the training grid, so
the logits of the same tokens do not depend on the call length; and its gradient at init is on
the scale of the S4D twin's (it must not set the global-norm clip of every parameter)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bst_dist.models import Cache, build

from tests.helpers.models import compiled_forward, tiny_cfg, tokens



def test_logits_do_not_depend_on_the_call_length():
    cfg = tiny_cfg(bst={"variant": "SH", "kernel": "unstruct"})
    model = build(cfg, nnx.Rngs(0))
    fwd = compiled_forward(model)
    B = 2
    x = tokens(5, B, 32)
    start = jnp.ones((B,), bool)
    short, _ = fwd(x[:, :8], Cache.zeros(cfg, B, seq_len=8), start)
    long, _ = fwd(x, Cache.zeros(cfg, B, seq_len=32), start)
    np.testing.assert_allclose(np.asarray(short), np.asarray(long[:, :8]), rtol=1e-5, atol=1e-5)
    # and past the training length (L = 32) the filter extends: a 64-token call starts the same way
    longer, _ = fwd(tokens(5, B, 64).at[:, :32].set(x), Cache.zeros(cfg, B, seq_len=64), start)
    np.testing.assert_allclose(np.asarray(longer[:, :32]), np.asarray(long), rtol=1e-5, atol=1e-5)


def _init_grad_norm(kernel: str, variant: str) -> float:
    cfg = tiny_cfg(bst={"variant": variant, "kernel": kernel})
    model = build(cfg, nnx.Rngs(0))
    B = 2
    x = tokens(3, B, cfg.seq_len + 1)

    def mean_nll(model):
        nats, count, _ = model.loss(x[:, :-1], x[:, 1:], jnp.ones((B, cfg.seq_len)), model.init_cache(B),
                                    jnp.ones((B,), bool))
        return nats / count

    return float(optax.tree.norm(nnx.grad(mean_nll)(model)))


@pytest.mark.parametrize("variant", ["SH", pytest.param("MF", marks=pytest.mark.slow)])
def test_unstruct_init_gradient_norm_is_on_the_s4d_scale(variant):
    s4d, unstruct = _init_grad_norm("s4d", variant), _init_grad_norm("unstruct", variant)
    assert unstruct < 10 * s4d, (variant, unstruct, s4d)

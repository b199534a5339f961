"""The fused-attention path of block self-attention (`block_self_attention_flash`, model.attention_impl
= "cudnn") against the exact XLA path, on CPU through jax.nn.dot_product_attention's "xla"
implementation (cuDNN itself needs a GPU: bench/step_bench.py checks it there)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bst_dist import config
from bst_dist.models import attention as attn

RNG = np.random.default_rng(7)


def _inputs(B, T, H, hd, W, valid):
    q, k, v = (attn.l2_normalize(jnp.asarray(RNG.normal(size=(B, T, H, hd)), jnp.float32)) for _ in range(3))
    kp, vp = (jnp.asarray(RNG.normal(size=(B, W, H, hd)), jnp.float32) for _ in range(2))
    alpha = jnp.asarray(RNG.uniform(0.5, 3.0, size=H), jnp.float32)
    table = jnp.asarray(RNG.normal(size=(H, 32)), jnp.float32)
    return q, k, v, kp, vp, jnp.asarray(valid), alpha, table


@pytest.mark.parametrize("W,T", [(8, 32), (16, 16)])  # several blocks; one block (Transformer-XL: W = L)
def test_flash_equals_xla_path_values_and_grads(W, T):
    B, H, hd = 3, 2, 8
    q, k, v, kp, vp, valid, alpha, table = _inputs(B, T, H, hd, W, [True, False, True])

    def run(fn, q, k, v, kp, vp, alpha, table):
        bias = attn.window_bias(table, W, 128)
        return fn(q, k, v, kp, vp, valid, alpha, bias, W)

    ref = lambda *a: attn.block_self_attention(*a, strict=False)
    flash = lambda *a: attn.block_self_attention_flash(*a, implementation="xla")
    args = (q, k, v, kp, vp, alpha, table)
    np.testing.assert_allclose(np.asarray(run(flash, *args)), np.asarray(run(ref, *args)), rtol=1e-5, atol=1e-6)

    ct = jnp.asarray(RNG.normal(size=q.shape), jnp.float32)  # a random cotangent
    loss = lambda fn: lambda *a: jnp.sum(run(fn, *a) * ct)
    g_ref = jax.grad(loss(ref), argnums=tuple(range(7)))(*args)
    g_fl = jax.grad(loss(flash), argnums=tuple(range(7)))(*args)
    for name, a, b in zip(["q", "k", "v", "k_prev", "v_prev", "alpha", "table"], g_fl, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=name)
    # the cache is only read where valid: no gradient reaches an invalid lane's previous block
    assert np.all(np.asarray(g_fl[3])[1] == 0) and np.all(np.asarray(g_fl[4])[1] == 0)
    assert np.any(np.asarray(g_fl[6]) != 0)  # the T5 table is trained through the bias


def test_flash_bf16_close_to_float32():
    B, T, H, hd, W = 2, 32, 2, 16, 8
    q, k, v, kp, vp, valid, alpha, table = _inputs(B, T, H, hd, W, [False, True])
    bias = attn.window_bias(table, W, 128)
    ref = attn.block_self_attention(q, k, v, kp, vp, valid, alpha, bias, W, strict=False)
    bf = lambda x: x.astype(jnp.bfloat16)
    got = attn.block_self_attention_flash(bf(q), bf(k), bf(v), bf(kp), bf(vp), valid, alpha, bias, W,
                                          implementation="xla")
    assert got.dtype == jnp.bfloat16
    err = float(jnp.linalg.norm(got.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    assert err < 1e-2, err


def test_config_attention_impl():
    cfg = config.from_dict({"model": {"attention_impl": "cudnn"}})
    assert cfg.model.attention_impl == "cudnn" and config.from_dict({}).model.attention_impl == "xla"
    for bad in ({"mask": "strict"}, {"attn_dropout": 0.05}, {"dtype": "float32"}):
        with pytest.raises(config.ConfigError, match="model.attention_impl"):
            config.from_dict({"model": {"attention_impl": "cudnn", **bad}})
    with pytest.raises(config.ConfigError, match="allowed: xla, cudnn"):
        config.from_dict({"model": {"attention_impl": "flash"}})


@pytest.mark.parametrize("W", [4, 16, 64])
def test_toeplitz_bias_equals_gather(W):
    table = jnp.asarray(RNG.normal(size=(3, 32)), jnp.float32)
    ct = jnp.asarray(RNG.normal(size=(3, W, 2 * W)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(attn.window_bias_toeplitz(table, W, 128)),
                                  np.asarray(attn.window_bias(table, W, 128)))
    g0 = jax.grad(lambda t: jnp.sum(attn.window_bias(t, W, 128) * ct))(table)
    g1 = jax.grad(lambda t: jnp.sum(attn.window_bias_toeplitz(t, W, 128) * ct))(table)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-5, atol=1e-5)


def test_cross_attention_flash_equals_attend():
    B, nb, W, H, hd = 2, 3, 8, 2, 8
    q, k, v = (attn.l2_normalize(jnp.asarray(RNG.normal(size=(B, nb, W, H, hd)), jnp.float32)) for _ in range(3))
    alpha = jnp.asarray(RNG.uniform(0.5, 3.0, size=H), jnp.float32)
    ct = jnp.asarray(RNG.normal(size=q.shape), jnp.float32)
    ref = lambda q, k, v, a: jnp.sum(attn.attend(q, k, v, a, mask=attn.causal_mask(W, strict=False)) * ct)
    fl = lambda q, k, v, a: jnp.sum(attn.block_cross_attention_flash(q, k, v, a, implementation="xla") * ct)
    np.testing.assert_allclose(float(fl(q, k, v, alpha)), float(ref(q, k, v, alpha)), rtol=1e-5)
    for a, b in zip(jax.grad(fl, argnums=(0, 1, 2, 3))(q, k, v, alpha), jax.grad(ref, argnums=(0, 1, 2, 3))(q, k, v, alpha)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)

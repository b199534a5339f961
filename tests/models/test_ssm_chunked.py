"""The chunked S4D (a Toeplitz matmul inside each chunk, the diagonal state passed across chunks)
computes the same function as the FFT path and the step-by-step recurrence, is causal, carries
the cross-sequence state exactly, and its window-end read equals the full output there."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bst_dist import config
from bst_dist.models import build, ssm
from bst_dist.models.bst import S4D

from tests.helpers.models import compiled_forward, tiny_cfg, tokens
from tests.models.test_ssm import recurrence, s4d_params

RNG = np.random.default_rng(7)


def _inputs(B, T, d, n2, C, init="lin"):
    log_dt, log_A_re, A_im, Ct = s4d_params(d=d, n2=n2, C=C, init=init)
    D = RNG.normal(size=(C, d))
    u = RNG.normal(size=(B, T, d))
    h0 = RNG.normal(size=(B, d, n2)) + 1j * RNG.normal(size=(B, d, n2))
    return log_dt, log_A_re, A_im, Ct, D, u, h0


def _fft_path(u, h, dtA, Bbar, Ct, D):
    T = u.shape[1]
    y = ssm.fft_conv(u, ssm.s4d_kernel(dtA, Bbar, Ct, T), D)
    zir, h_new = ssm.s4d_carry(u, h, dtA, Bbar, Ct)
    return y + zir, h_new


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("T,c,init", [(40, 1, "lin"), (40, 8, "inv"), (96, 32, "lin"), (64, 64, "inv")])
def test_chunked_equals_recurrence_with_carry(T, c, init):
    log_dt, log_A_re, A_im, Ct, D, u, h0 = _inputs(2, T, 3, 4, 2, init)
    want, x_end = recurrence(u, log_dt, log_A_re, A_im, Ct, D, h0)
    dtA, Bbar = ssm.s4d_discretize(log_dt, log_A_re, A_im)
    y, h = ssm.s4d_chunked(jnp.asarray(u, jnp.float32), jnp.asarray(h0, jnp.complex64), dtA, Bbar, Ct,
                           jnp.asarray(D, jnp.float32), c)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(h), x_end, rtol=1e-4, atol=1e-4)
    # without a carried state the output is the plain convolution and no state comes back
    y0, none = ssm.s4d_chunked(jnp.asarray(u, jnp.float32), None, dtA, Bbar, Ct, jnp.asarray(D, jnp.float32), c)
    want0, _ = recurrence(u, log_dt, log_A_re, A_im, Ct, D)
    assert none is None
    np.testing.assert_allclose(np.asarray(y0), want0, rtol=1e-4, atol=1e-4)


def _compare_with_fft(T, c, d=4, n2=8, C=2):
    log_dt, log_A_re, A_im, Ct, D, u, h0 = _inputs(1, T, d, n2, C)
    dtA, Bbar = ssm.s4d_discretize(log_dt, log_A_re, A_im)
    args = (jnp.asarray(u, jnp.float32), jnp.asarray(h0, jnp.complex64), dtA, Bbar, Ct)
    y_fft, h_fft = jax.jit(_fft_path)(*args, jnp.asarray(D, jnp.float32))
    y, h = jax.jit(ssm.s4d_chunked, static_argnums=6)(*args, jnp.asarray(D, jnp.float32), c)
    assert np.isfinite(np.asarray(y)).all()
    assert _rel(y, np.asarray(y_fft)) < 1e-5
    assert _rel(h, np.asarray(h_fft)) < 1e-5


def test_chunked_equals_fft_path_at_4k():
    _compare_with_fft(4096, 64)


@pytest.mark.slow
def test_chunked_equals_fft_path_at_65k():
    _compare_with_fft(65536, 64)


def test_chunked_is_causal():
    log_dt, log_A_re, A_im, Ct, D, u, _ = _inputs(1, 64, 3, 4, 2)
    dtA, Bbar = ssm.s4d_discretize(log_dt, log_A_re, A_im)
    f = lambda v: np.asarray(ssm.s4d_chunked(jnp.asarray(v, jnp.float32), None, dtA, Bbar, Ct,  # noqa: E731
                                             jnp.asarray(D, jnp.float32), 16)[0])
    t = 37  # inside a chunk, not at its edge
    v = u.copy()
    v[:, t:] = RNG.normal(size=v[:, t:].shape)
    a, b = f(u), f(v)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:])


def test_window_ends_equal_full_output_there():
    d, C, N, W, T = 5, 3, 8, 16, 64
    m = S4D(d, C, N, "lin", nnx.Rngs(0), impl="chunked", chunk=8)
    u = jnp.asarray(RNG.normal(size=(2, T, d)), jnp.float32)
    h = jnp.asarray(RNG.normal(size=(2, d, N // 2)) + 1j * RNG.normal(size=(2, d, N // 2)), jnp.complex64)
    y, h_new = m(u, h)
    ends, h_ends = m.window_ends(u, h, W)
    np.testing.assert_allclose(np.asarray(ends), np.asarray(y[:, W - 1::W]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h_ends), np.asarray(h_new), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["SH", "MF"])
def test_model_logits_and_grads_equal_between_impls(variant):
    """A one-layer BST model under ssm_impl chunked and fft, same weights: same logits (also
    through the carry) and same gradients."""
    outs = {}
    for impl in ("chunked", "fft"):
        cfg = tiny_cfg(num_layers=1, bst_layers=[0], brect_layers=[],
                       bst={"variant": variant, "ssm_impl": impl, "ssm_chunk": 4})
        model = build(cfg, nnx.Rngs(3))
        graphdef, state = nnx.split(model)
        x = tokens(5, 2, cfg.seq_len)
        start = jnp.ones((2,), bool)
        cache0 = model.init_cache(2)

        fwd = compiled_forward(model)
        first, cache = fwd(x, cache0, start)
        second, _ = fwd(x, cache, ~start)

        def loss(state, x):
            return jnp.mean(nnx.merge(graphdef, state)(x, cache0, start)[0] ** 2)

        outs[impl] = (np.asarray(first), np.asarray(second), jax.tree.leaves(jax.jit(jax.grad(loss))(state, x)))
    (a1, a2, ga), (b1, b2, gb) = outs["chunked"], outs["fft"]
    np.testing.assert_allclose(a1, b1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a2, b2, rtol=1e-4, atol=1e-4)
    assert len(ga) == len(gb)
    for p, q in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=1e-3, atol=1e-5)


def test_chunk_that_does_not_divide_the_block_is_one_line_error():
    with pytest.raises(config.ConfigError, match=r"model\.bst\.ssm_chunk: 24 must divide model\.block_len W=64"):
        config.validate(config.from_dict({"model": {"block_len": 64, "seq_len": 128, "bst": {"ssm_chunk": 24}}}))
    with pytest.raises(config.ConfigError, match="model.bst.ssm_impl"):
        config.from_dict({"model": {"bst": {"ssm_impl": "scan"}}})

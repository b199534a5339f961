"""SSM math against naive references: FFT convolution vs direct convolution, the S4D kernel vs
the step-by-step recurrence, and the exact cross-sequence carries (docs/models.md, 7A, 7B)."""

import numpy as np
import jax.numpy as jnp
import pytest

from bst_dist.models import ssm

RNG = np.random.default_rng(0)


def direct_conv(u, k, D):
    """y[b,t,d,c] = sum_{s<=t} k[t-s,c,d] u[b,s,d] + D[c,d] u[b,t,d], by loops over t."""
    B, T, d = u.shape
    C = k.shape[1]
    k = np.concatenate([k, np.zeros((max(0, T - k.shape[0]), C, d))], 0)  # finite support: 0 beyond
    y = np.zeros((B, T, d, C))
    for t in range(T):
        # (B, t+1, d) x (t+1, C, d) reversed in time
        y[:, t] = np.einsum("bsd,scd->bdc", u[:, : t + 1], k[t::-1])
    return y + np.einsum("btd,cd->btdc", u, D)


def s4d_params(d=3, n2=4, C=2, init="lin"):
    log_A_re, A_im = ssm.s4d_init_A(d, n2, init)
    log_A_re = log_A_re + RNG.normal(scale=0.3, size=log_A_re.shape)  # off the init, still stable
    log_dt = np.log(RNG.uniform(1e-2, 1e-1, size=(d,)))
    Ct = RNG.normal(size=(C, d, n2)) + 1j * RNG.normal(size=(C, d, n2))
    return (jnp.asarray(log_dt, jnp.float32), jnp.asarray(log_A_re, jnp.float32), jnp.asarray(A_im),
            jnp.asarray(Ct, jnp.complex64))


def recurrence(u, log_dt, log_A_re, A_im, Ct, D, h0=None):
    """x_t = Abar x_{t-1} + Bbar u_t; y_t = 2 Re(C~ x_t) + D u_t, in float64."""
    A = -np.exp(np.asarray(log_A_re, np.float64)) + 1j * np.asarray(A_im, np.float64)
    dtA = np.exp(np.asarray(log_dt, np.float64))[:, None] * A
    Ab, Bb = np.exp(dtA), (np.exp(dtA) - 1) / A
    B, T, d = u.shape
    x = np.zeros((B, d, A.shape[1]), complex) if h0 is None else h0.copy()
    ys = []
    for t in range(T):
        x = Ab * x + Bb * u[:, t, :, None]
        ys.append(2 * np.real(np.einsum("bdn,cdn->bdc", x, np.asarray(Ct))) + np.einsum("bd,cd->bdc", u[:, t], D))
    return np.stack(ys, 1), x


def test_fft_conv_equals_direct_convolution():
    u = RNG.normal(size=(2, 37, 3))
    k = RNG.normal(size=(37, 2, 3))
    D = RNG.normal(size=(2, 3))
    got = ssm.fft_conv(jnp.asarray(u, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(D, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), direct_conv(u, k, D), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_s4d_kernel_convolution_equals_recurrence(init):
    log_dt, log_A_re, A_im, Ct = s4d_params(init=init)
    D = RNG.normal(size=(2, 3))
    u = RNG.normal(size=(2, 50, 3))
    dtA, Bbar = ssm.s4d_discretize(log_dt, log_A_re, A_im)
    K = ssm.s4d_kernel(dtA, Bbar, Ct, 50)
    got = ssm.fft_conv(jnp.asarray(u, jnp.float32), K, jnp.asarray(D, jnp.float32))
    want, _ = recurrence(u, log_dt, log_A_re, A_im, Ct, D)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_s4d_carry_is_exact_over_three_sequences():
    log_dt, log_A_re, A_im, Ct = s4d_params()
    D = RNG.normal(size=(2, 3))
    T, nseq = 24, 3
    u = RNG.normal(size=(2, T * nseq, 3))
    want, _ = recurrence(u, log_dt, log_A_re, A_im, Ct, D)
    dtA, Bbar = ssm.s4d_discretize(log_dt, log_A_re, A_im)
    K = ssm.s4d_kernel(dtA, Bbar, Ct, T)
    h = jnp.zeros((2, 3, 4), jnp.complex64)
    ys = []
    for s in range(nseq):
        us = jnp.asarray(u[:, s * T:(s + 1) * T], jnp.float32)
        zir, h = ssm.s4d_carry(us, h, dtA, Bbar, Ct)
        ys.append(ssm.fft_conv(us, K, jnp.asarray(D, jnp.float32)) + zir)
    np.testing.assert_allclose(np.concatenate(ys, 1), want, rtol=1e-4, atol=1e-4)
    # and the carried state is the recurrence's state after the last token
    _, x_end = recurrence(u, log_dt, log_A_re, A_im, Ct, D)
    np.testing.assert_allclose(np.asarray(h), x_end, rtol=1e-4, atol=1e-4)


def test_unstruct_prefix_carry_equals_linear_convolution_of_concatenation():
    T = 20
    up, uc = RNG.normal(size=(2, T, 3)), RNG.normal(size=(2, T, 3))
    k = RNG.normal(size=(T, 2, 3))  # finite support T
    D = RNG.normal(size=(2, 3))
    want = direct_conv(np.concatenate([up, uc], 1), k, D)[:, T:]
    got = ssm.fft_conv_with_prefix(jnp.asarray(up, jnp.float32), jnp.asarray(uc, jnp.float32),
                                   jnp.asarray(k, jnp.float32), jnp.asarray(D, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    # a zero prefix is the plain causal convolution
    got0 = ssm.fft_conv_with_prefix(jnp.zeros((2, T, 3)), jnp.asarray(uc, jnp.float32), jnp.asarray(k, jnp.float32),
                                    jnp.asarray(D, jnp.float32))
    np.testing.assert_allclose(np.asarray(got0), direct_conv(uc, k, D), rtol=1e-4, atol=1e-4)


def test_hyena_features_and_decay_shapes():
    pe = ssm.positional_features(16, 33, L=16)
    assert pe.shape == (16, 33)
    np.testing.assert_allclose(np.asarray(pe[:, 0]), np.arange(16) / 16, rtol=1e-6)
    dec = np.asarray(ssm.hyena_decay(100, 4, L=100))
    assert np.all(dec[0] == 1.0) and np.all(np.diff(dec, axis=0) <= 0)
    # the fastest channel reaches 1% by 30% of the training length, the slowest by 150%
    assert dec[30, -1] == pytest.approx(0.01, rel=0.1)


def test_hyena_grid_is_the_training_length():
    """Tap k is the same function of k / L for every call length T: a short call is a prefix of
    a long one, and taps past L continue the function."""
    L = 16
    for T in (8, 32):
        np.testing.assert_array_equal(np.asarray(ssm.positional_features(T, 33, L)),
                                      np.asarray(ssm.positional_features(64, 33, L))[:T])
        np.testing.assert_array_equal(np.asarray(ssm.hyena_decay(T, 4, L)),
                                      np.asarray(ssm.hyena_decay(64, 4, L))[:T])

"""SSM math as plain functions: S4D kernels, Hyena-style unstructured filters, the FFT
convolution, and the exact cross-sequence carry (MODEL_SPEC sections 5.2 and 7).

Shapes: u (B, T, d) real; kernels k (T, C, d); outputs y (B, T, d, C). C is the number of
channels per feature (1 for SH, H for MH, S for MF).

S4D multi-channel convention (as in S4's `channels`): A, dt (and B = 1) are per feature d and
shared by the C output channels; only C~ and D differ per channel. Two consequences we rely on:
the recurrent state x_t = Abar x_{t-1} + Bbar u_t does not depend on the channel, so the carry is
(B, d, N/2) rather than (B, C, d, N/2) (C times smaller, for MF 32x), and the Vandermonde
exp(dt*A*t) is (d, N/2, T), shared by the kernel, the zero-input response and the new state.
Everything here runs in float32 / complex64 whatever the model's compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


# --------------------------------------------------------------------------------------------
# S4D


def s4d_init_A(d: int, n2: int, init: str = "lin") -> tuple[jax.Array, jax.Array]:
    """(log_A_re, A_im), each (d, N/2). S4D-Lin: Re A = -1/2, Im A = pi n; S4D-Inv: N/pi (N/(2n+1) - 1)."""
    n = jnp.arange(n2, dtype=jnp.float32)
    if init == "lin":
        im = math.pi * n
    elif init == "inv":
        N = 2 * n2
        im = (N / math.pi) * (N / (2 * n + 1) - 1)
    else:
        raise ValueError(f"s4d init {init!r}; allowed: lin, inv")
    log_re = jnp.full((d, n2), math.log(0.5), jnp.float32)
    return log_re, jnp.broadcast_to(im, (d, n2)).astype(jnp.float32)


def s4d_discretize(log_dt: jax.Array, log_A_re: jax.Array, A_im: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ZOH with B = 1: returns (dtA (d, N/2) complex, Bbar (d, N/2) complex)."""
    A = -jnp.exp(log_A_re.astype(jnp.float32)) + 1j * A_im.astype(jnp.float32)
    dtA = jnp.exp(log_dt.astype(jnp.float32))[:, None] * A
    Bbar = (jnp.exp(dtA) - 1.0) / A
    return dtA.astype(jnp.complex64), Bbar.astype(jnp.complex64)


def vandermonde(dtA: jax.Array, T: int, offset: int = 0) -> jax.Array:
    """exp(dtA * (t + offset)) for t = 0..T-1: (d, N/2, T) complex64."""
    t = jnp.arange(T, dtype=jnp.float32) + offset
    return jnp.exp(dtA[..., None] * t)


def s4d_kernel(dtA: jax.Array, Bbar: jax.Array, C: jax.Array, T: int, V: jax.Array | None = None) -> jax.Array:
    """K_l = 2 Re sum_n C~_n Bbar_n Abar_n^l, l = 0..T-1. C: (C, d, N/2) complex -> (T, C, d) float32.

    V: the Vandermonde `vandermonde(dtA, T)`, when the caller shares it with `s4d_carry`.
    """
    V = vandermonde(dtA, T) if V is None else V  # (d, N2, T)
    return 2.0 * jnp.real(jnp.einsum("cdn,dnt->tcd", C * Bbar[None], V))


def s4d_carry(u: jax.Array, h: jax.Array, dtA: jax.Array, Bbar: jax.Array, C: jax.Array,
              V: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The exact cross-sequence carry (MODEL_SPEC 7A).

    u (B, T, d) this sequence's SSM input; h (B, d, N/2) complex state after the previous
    sequence's last token (0 at a document start). Returns
      zir (B, T, d, C): 2 Re sum_n C~_n Abar_n^(t+1) h_n, the zero-input response to add to the
          convolution output (exponent t+1: h is the state *before* token 0 is read);
      h_new (B, d, N/2): Abar^T h + Bbar sum_j Abar^(T-1-j) u_j.
    Both reuse one Vandermonde V = Abar^t (d, N/2, T): the response as (C~ Abar) V, the new
    state with V reversed. Only powers with |Abar| <= 1 appear, so nothing overflows.
    """
    T = u.shape[1]
    V = vandermonde(dtA, T) if V is None else V
    Abar = jnp.exp(dtA)
    zir = 2.0 * jnp.real(jnp.einsum("bdn,cdn,dnt->btdc", h, C * Abar[None], V))
    u_c = u.astype(jnp.float32).astype(jnp.complex64)
    h_new = jnp.exp(dtA * T) * h + Bbar * jnp.einsum("btd,dnt->bdn", u_c, jnp.flip(V, axis=-1))
    return zir, h_new


# --------------------------------------------------------------------------------------------
# Unstructured (Hyena-style implicit) filters


def positional_features(T: int, emb_dim: int) -> jax.Array:
    """Hyena's PE(t_k) = [t_k, cos(2 pi f_j k / T), -sin(2 pi f_j k / T)], (T, emb_dim)."""
    J = (emb_dim - 1) // 2
    t = jnp.linspace(0.0, 1.0, T, dtype=jnp.float32)[:, None]
    k = jnp.arange(T, dtype=jnp.float32)[:, None]
    f = jnp.linspace(1e-4, J - 1, J, dtype=jnp.float32)[None, :]
    z = 2 * math.pi * f * k / T
    return jnp.concatenate([t, jnp.cos(z), -jnp.sin(z)], axis=-1)


def hyena_decay(T: int, n_out: int, fast: float = 0.3, slow: float = 1.5, target: float = 1e-2) -> jax.Array:
    """exp(-|delta| t) with |delta| = linspace(ln(1/target)/slow, ln(1/target)/fast): (T, n_out).

    The filters fall to 1% of their start between 30% and 150% of the sequence (Hyena's default).
    """
    t = jnp.linspace(0.0, 1.0, T, dtype=jnp.float32)[:, None]
    deltas = jnp.linspace(math.log(1 / target) / slow, math.log(1 / target) / fast, n_out, dtype=jnp.float32)
    return jnp.exp(-t * deltas[None, :])


# --------------------------------------------------------------------------------------------
# FFT convolution


def fft_conv(u: jax.Array, k: jax.Array, D: jax.Array) -> jax.Array:
    """Causal long convolution y[b,t,d,c] = sum_{s<=t} k[t-s,c,d] u[b,s,d] + D[c,d] u[b,t,d].

    u (B, T, d), k (T, C, d), D (C, d) -> (B, T, d, C) float32. FFT over time at size 2T with
    default norms (MODEL_SPEC 9: the paper's pseudocode transforms the wrong axis and rescales).
    """
    T = u.shape[1]
    uf = jnp.fft.rfft(u.astype(jnp.float32), n=2 * T, axis=1)  # (B, F, d)
    kf = jnp.fft.rfft(k.astype(jnp.float32), n=2 * T, axis=0)  # (F, C, d)
    y = jnp.fft.irfft(uf[:, :, None, :] * kf[None], n=2 * T, axis=1)[:, :T]  # (B, T, C, d)
    y = y + D[None, None].astype(jnp.float32) * u[:, :, None, :].astype(jnp.float32)
    return jnp.swapaxes(y, 2, 3)


def fft_conv_with_prefix(u_prev: jax.Array, u: jax.Array, k: jax.Array, D: jax.Array) -> jax.Array:
    """Finite-support carry for unstructured filters (MODEL_SPEC 7B).

    The last T outputs of the *circular* convolution at size 2T over [u_prev; u] equal the linear
    convolution of the concatenation there (wrap-around only pollutes indices < T - 1), so the
    filter sees the previous sequence at no extra FFT cost. u_prev, u (B, T, d) -> (B, T, d, C).
    """
    T = u.shape[1]
    x = jnp.concatenate([u_prev, u], axis=1).astype(jnp.float32)  # (B, 2T, d)
    xf = jnp.fft.rfft(x, n=2 * T, axis=1)
    kf = jnp.fft.rfft(k.astype(jnp.float32), n=2 * T, axis=0)
    y = jnp.fft.irfft(xf[:, :, None, :] * kf[None], n=2 * T, axis=1)[:, T:]
    y = y + D[None, None].astype(jnp.float32) * u[:, :, None, :].astype(jnp.float32)
    return jnp.swapaxes(y, 2, 3)

"""SSM math as plain functions: S4D kernels, Hyena-style unstructured filters, the FFT
convolution, and the exact cross-sequence carry (docs/model_spec.md, sections 4 and 5).

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
    """The exact cross-sequence carry (docs/model_spec.md, section 5).

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


def positional_features(T: int, emb_dim: int, L: int) -> jax.Array:
    """Hyena's PE(t_k) = [t_k, cos(2 pi f_j t_k), -sin(2 pi f_j t_k)] at t_k = k / L, k = 0..T-1:
    (T, emb_dim). The grid is the training length L whatever T, so a tap's value never depends on
    the call length; taps k >= L (T > L) extend the learned function past t = 1."""
    J = (emb_dim - 1) // 2
    t = (jnp.arange(T, dtype=jnp.float32) / L)[:, None]
    f = jnp.linspace(1e-4, J - 1, J, dtype=jnp.float32)[None, :]
    z = 2 * math.pi * f * t
    return jnp.concatenate([t, jnp.cos(z), -jnp.sin(z)], axis=-1)


def hyena_decay(T: int, n_out: int, L: int, fast: float = 0.3, slow: float = 1.5,
                target: float = 1e-2) -> jax.Array:
    """exp(-|delta| t_k) at t_k = k / L with |delta| = linspace(ln(1/target)/slow,
    ln(1/target)/fast): (T, n_out). The filters fall to 1% of their start between 30% and 150% of
    the training length L (Hyena's default), on the same grid as `positional_features`.
    """
    t = (jnp.arange(T, dtype=jnp.float32) / L)[:, None]
    deltas = jnp.linspace(math.log(1 / target) / slow, math.log(1 / target) / fast, n_out, dtype=jnp.float32)
    return jnp.exp(-t * deltas[None, :])


# --------------------------------------------------------------------------------------------
# FFT convolution


def fft_conv(u: jax.Array, k: jax.Array, D: jax.Array) -> jax.Array:
    """Causal long convolution y[b,t,d,c] = sum_{s<=t} k[t-s,c,d] u[b,s,d] + D[c,d] u[b,t,d].

    u (B, T, d), k (T, C, d), D (C, d) -> (B, T, d, C) float32. FFT over time at size 2T with
    default norms (docs/model_spec.md 6: the paper's pseudocode transforms the wrong axis and rescales).
    """
    T = u.shape[1]
    uf = jnp.fft.rfft(u.astype(jnp.float32), n=2 * T, axis=1)  # (B, F, d)
    kf = jnp.fft.rfft(k.astype(jnp.float32), n=2 * T, axis=0)  # (F, C, d)
    y = jnp.fft.irfft(uf[:, :, None, :] * kf[None], n=2 * T, axis=1)[:, :T]  # (B, T, C, d)
    y = y + D[None, None].astype(jnp.float32) * u[:, :, None, :].astype(jnp.float32)
    return jnp.swapaxes(y, 2, 3)


def fft_conv_with_prefix(u_prev: jax.Array, u: jax.Array, k: jax.Array, D: jax.Array) -> jax.Array:
    """Finite-support carry for unstructured filters (docs/model_spec.md, section 5).

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


# --------------------------------------------------------------------------------------------
# Chunked S4D: exact, linear in L, no FFT and no L-long Vandermonde
#
# With x_t = Abar x_{t-1} + Bbar u_t and y_t = 2 Re(C~ x_t) + D u_t, cut the sequence into chunks
# of c tokens and let s_j be the state before chunk j (s_0 = the carried state h). For position
# i of chunk j:
#   y = sum_{k<=i} K_{i-k} u_{jc+k}  (a c x c Toeplitz matmul with the c-long kernel)
#     + 2 Re C~ Abar^(i+1) s_j       (the zero-input response, the carry's algebra per chunk)
#     + D u
#   s_{j+1} = Abar^c s_j + Bbar sum_k Abar^(c-1-k) u_{jc+k}
# The state recurrence over chunks is an associative scan of (Abar^c, b_j) pairs. Complex
# products are written as real matmuls over [Re; Im] (2 N/2 wide) at full float32 precision,
# so the result matches the FFT path and the step-by-step recurrence to float32 rounding.

_HI = jax.lax.Precision.HIGHEST


def _chunk_inputs_to_states(u: jax.Array, dtA: jax.Array, Bbar: jax.Array, c: int) -> jax.Array:
    """b_j = Bbar sum_k Abar^(c-1-k) u_{jc+k}: u (B, T, d) -> (B, T/c, d, N/2) complex64."""
    B, T, d = u.shape
    G = Bbar[..., None] * jnp.flip(vandermonde(dtA, c), axis=-1)  # (d, N2, c): Bbar Abar^(c-1-k)
    Gr = jnp.concatenate([jnp.real(G), jnp.imag(G)], axis=1)  # (d, 2 N2, c)
    uc = u.astype(jnp.float32).reshape(B, T // c, c, d)
    b = jnp.einsum("bjkd,dmk->bjdm", uc, Gr, precision=_HI)
    n2 = dtA.shape[-1]
    return jax.lax.complex(b[..., :n2], b[..., n2:])


def _scan_states(b: jax.Array, a: jax.Array, h: jax.Array | None) -> jax.Array:
    """States after each chunk, S_j = a S_{j-1} + b_j with S_{-1} = h: b (B, J, d, N2) -> same."""
    if h is not None:
        b = b.at[:, 0].add(a * h)
    aj = jnp.broadcast_to(a, b.shape)

    def combine(x, y):  # (a1, b1) then (a2, b2): a2 a1, a2 b1 + b2
        return y[0] * x[0], y[0] * x[1] + y[1]

    return jax.lax.associative_scan(combine, (aj, b), axis=1)[1]


def s4d_window_end_states(u: jax.Array, h: jax.Array | None, dtA: jax.Array, Bbar: jax.Array,
                          c: int) -> jax.Array:
    """The state after the last token of each c-long chunk: (B, T/c, d, N/2) complex64.

    x_{jc+c-1} for j = 0..T/c-1, starting from h (B, d, N/2) (None: zero). The last row is the
    carry for the next sequence.
    """
    b = _chunk_inputs_to_states(u, dtA, Bbar, c)
    return _scan_states(b, jnp.exp(dtA * c), h)


def _realify_out(P: jax.Array) -> jax.Array:
    """2 Re(P s) = [2 Re P, -2 Im P] . [Re s; Im s]: P (..., N2) complex -> (..., 2 N2) real."""
    return jnp.concatenate([2.0 * jnp.real(P), -2.0 * jnp.imag(P)], axis=-1)


def s4d_readout(states: jax.Array, C: jax.Array) -> jax.Array:
    """2 Re sum_n C~_n x_n: states (B, J, d, N2) complex, C (C, d, N2) -> (B, J, d, C) float32."""
    s = jnp.concatenate([jnp.real(states), jnp.imag(states)], axis=-1)
    return jnp.einsum("bjdm,cdm->bjdc", s, _realify_out(C), precision=_HI)


def s4d_chunked(u: jax.Array, h: jax.Array | None, dtA: jax.Array, Bbar: jax.Array, C: jax.Array,
                D: jax.Array, c: int) -> tuple[jax.Array, jax.Array | None]:
    """The S4D convolution plus the carry's zero-input response, chunk by chunk.

    u (B, T, d), h (B, d, N/2) complex or None, C (C, d, N/2) complex, D (C, d); c divides T.
    Returns y (B, T, d, C) float32 (what `fft_conv(u, s4d_kernel(...), D) + zir` gives) and the
    state after the last token (None when h is None).
    """
    B, T, d = u.shape
    if T % c:
        raise ValueError(f"chunked S4D: chunk {c} must divide the sequence length T={T}")
    J = T // c
    Cn = C.shape[0]
    uf = u.astype(jnp.float32)
    V = vandermonde(dtA, c)  # (d, N2, c): Abar^i
    # intra-chunk: causal Toeplitz of the c-long kernel, (c, c, C, d)
    K = s4d_kernel(dtA, Bbar, C, c, V)
    i = jnp.arange(c)
    lag = i[:, None] - i[None, :]
    Tm = jnp.where((lag >= 0)[:, :, None, None], K[jnp.clip(lag, 0)], 0.0)
    uc = uf.reshape(B, J, c, d)
    y = jnp.einsum("ikcd,bjkd->bjidc", Tm, uc, precision=_HI)
    # states entering each chunk: s_0 = h, s_j = state after chunk j-1
    ends = s4d_window_end_states(uf, h, dtA, Bbar, c)  # (B, J, d, N2)
    h0 = jnp.zeros_like(ends[:, :1]) if h is None else h[:, None].astype(ends.dtype)
    starts = jnp.concatenate([h0, ends[:, :-1]], axis=1)
    # zero-input response inside chunk: 2 Re C~ Abar^(i+1) s_j
    P = C[:, :, :, None] * (V * jnp.exp(dtA)[..., None])[None]  # (C, d, N2, c)
    Pr = _realify_out(jnp.moveaxis(P, -1, -2))  # (C, d, c, 2 N2)
    s = jnp.concatenate([jnp.real(starts), jnp.imag(starts)], axis=-1)  # (B, J, d, 2 N2)
    y = y + jnp.einsum("bjdm,cdim->bjidc", s, Pr, precision=_HI)
    y = y.reshape(B, T, d, Cn) + jnp.einsum("btd,cd->btdc", uf, D.astype(jnp.float32))
    return y, (None if h is None else ends[:, -1])

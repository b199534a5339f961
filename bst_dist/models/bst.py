"""The Block-State Transformer layer: a Block Transformer layer whose tokens also
cross-attend to SSM-produced context states, SH / MH / MF x s4d / unstruct, with the exact
non-differentiable cross-sequence SSM carry (docs/model_spec.md, sections 4 and 5).

Context states per variant, from the SSM output y (B, T, d, C):
  SH: C = 1, lifted to H heads by a per-head affine map; window i attends causally to its own W
      positions.  MH: C = H, one filter bank per head, same mask.
  MF: C = S; the last position of each window, shifted by one window (window 0 gets the
      previous sequence's last context, or the learned initial context at a document start),
      lifted to heads, plus learned context ids; no mask.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from bst_dist.config import ConfigError, ModelConfig
from bst_dist.models import attention as attn
from bst_dist.models import flops, registry, ssm
from bst_dist.models.block import SelfAttention, xl_cache_shape
from bst_dist.models.modules import (Dropout, HeadProjection, HeadScale, PostAttn, RMSNorm, attn_dropout,
                                     fan_in_init, normal, param)


def num_channels(cfg: ModelConfig) -> int:
    return {"SH": 1, "MH": cfg.num_heads, "MF": cfg.bst.num_context_states}[cfg.bst.variant]


class S4D(nnx.Module):
    """Diagonal SSMs, N/2 complex modes per feature, C output channels sharing A and dt.

    impl "chunked" computes the convolution chunk by chunk (`ssm.s4d_chunked`, chunk tokens),
    "fft" with one 2T-point FFT; both compute the same function.
    """

    def __init__(self, d: int, C: int, N: int, init: str, rngs: nnx.Rngs, impl: str = "chunked",
                 chunk: int = 64):
        n2 = N // 2
        self.impl, self.chunk = impl, chunk
        log_A_re, A_im = ssm.s4d_init_A(d, n2, init)
        u = jax.random.uniform(rngs.params(), (d,), jnp.float32)
        self.log_dt = nnx.Param(math.log(1e-3) + u * (math.log(1e-1) - math.log(1e-3)), axes=(None,))
        self.log_A_re = nnx.Param(log_A_re, axes=(None, None))
        self.A_im = nnx.Param(A_im, axes=(None, None))
        self.C_re = param(rngs, normal(math.sqrt(0.5)), (C, d, n2), (None, None, None))
        self.C_im = param(rngs, normal(math.sqrt(0.5)), (C, d, n2), (None, None, None))
        self.D = param(rngs, normal(1.0), (C, d), (None, None))

    def _params(self):
        return (self.log_dt[...], self.log_A_re[...], self.A_im[...], self.C_re[...], self.C_im[...], self.D[...])

    def __call__(self, u: jax.Array, h: jax.Array | None):
        """u (B, T, d); h (B, d, N/2) complex or None -> y (B, T, d, C) float32, new h or None."""
        if self.impl == "chunked":
            return _s4d_apply_chunked(u, h, *self._params(), self.chunk)
        return _s4d_apply(u, h, *self._params())

    def window_ends(self, u: jax.Array, h: jax.Array | None, W: int):
        """y at the last position of each W-window only, (B, T/W, d, C) float32, and the new h.

        Reads the state after each window (`ssm.s4d_window_end_states`): no output at the other
        T - T/W positions is computed. Equals `self(u, h)[0][:, W-1::W]`.
        """
        return _s4d_window_ends(u, h, *self._params(), W=W)


@jax.checkpoint  # recompute the (d, N/2, T) Vandermonde in the backward pass instead of storing it
def _s4d_apply(u, h, log_dt, log_A_re, A_im, C_re, C_im, D):
    T = u.shape[1]
    dtA, Bbar = ssm.s4d_discretize(log_dt, log_A_re, A_im)
    Ct = (C_re + 1j * C_im).astype(jnp.complex64)
    V = ssm.vandermonde(dtA, T)
    y = ssm.fft_conv(u, ssm.s4d_kernel(dtA, Bbar, Ct, T, V), D)
    if h is None:
        return y, None
    zir, h_new = ssm.s4d_carry(u, h, dtA, Bbar, Ct, V)
    return y + zir, h_new


@functools.partial(jax.checkpoint, static_argnums=(8,))  # recompute the per-chunk terms in backward
def _s4d_apply_chunked(u, h, log_dt, log_A_re, A_im, C_re, C_im, D, chunk):
    dtA, Bbar = ssm.s4d_discretize(log_dt, log_A_re, A_im)
    Ct = (C_re + 1j * C_im).astype(jnp.complex64)
    return ssm.s4d_chunked(u, h, dtA, Bbar, Ct, D, chunk)


def _s4d_window_ends(u, h, log_dt, log_A_re, A_im, C_re, C_im, D, W):
    dtA, Bbar = ssm.s4d_discretize(log_dt, log_A_re, A_im)
    Ct = (C_re + 1j * C_im).astype(jnp.complex64)
    states = ssm.s4d_window_end_states(u, h, dtA, Bbar, W)  # (B, T/W, d, N2)
    u_end = u[:, W - 1::W].astype(jnp.float32)  # (B, T/W, d)
    y = ssm.s4d_readout(states, Ct) + u_end[..., None] * jnp.swapaxes(D, 0, 1).astype(jnp.float32)
    return y, (None if h is None else states[:, -1])


class ImplicitFilter(nnx.Module):
    """Hyena-style unstructured filter: h(t) = exp(-|delta| t) MLP(PE(t)), finite support T;
    MLP = three sine layers sin(f z W1 + b1), sin(z W2 + b2), sin(z W3 + b3), then W_out.

    Tap k is the filter at t = k / L, L the training length, for every call length T (the taps
    of a T-long call are the first T of a longer one; past L they extend the learned function)."""

    def __init__(self, d: int, C: int, emb_dim: int, hidden: int, sin_freq: float, L: int, rngs: nnx.Rngs):
        self.d, self.C, self.emb_dim, self.L = d, C, emb_dim, L
        dims = [emb_dim, hidden, hidden, hidden]
        self.w = nnx.List([param(rngs, fan_in_init, (a, b), (None, None)) for a, b in zip(dims[:-1], dims[1:])])
        self.b = nnx.List([nnx.Param(jnp.zeros((b,), jnp.float32), axes=(None,)) for b in dims[1:]])
        self.freq = nnx.Param(jnp.full((hidden,), sin_freq, jnp.float32), axes=(None,))
        self.w_out = param(rngs, fan_in_init, (hidden, C * d), (None, None))
        self.D = param(rngs, normal(1.0), (C, d), (None, None))

    def filter(self, T: int) -> jax.Array:
        """(T, C, d) float32."""
        z = ssm.positional_features(T, self.emb_dim, self.L)
        # the sine frequency scales the first layer only (SIREN's omega_0), where it sets the
        # bandwidth of the positional features; the hidden sines run at frequency 1. Scaling all
        # three multiplies the first weight's gradient by about freq^3 (at freq 14: a global
        # gradient norm ~100x the S4D twin's at init, which then sets every parameter's clip).
        for i, (w, b) in enumerate(zip(self.w, self.b)):
            z = jnp.sin((self.freq[...] if i == 0 else 1.0) * (z @ w[...] + b[...]))
        k = (z @ self.w_out[...]) * ssm.hyena_decay(T, self.C * self.d, self.L)
        return k.reshape(T, self.C, self.d)

    def __call__(self, u: jax.Array, u_prev: jax.Array | None):
        k = self.filter(u.shape[1])
        if u_prev is None:
            return ssm.fft_conv(u, k, self.D[...]), None
        return ssm.fft_conv_with_prefix(u_prev, u, k, self.D[...]), u


class BSTLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, H, hd, b = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.bst
        C = num_channels(cfg)
        self.attn = SelfAttention(cfg, with_q2=True, rngs=rngs)
        if b.kernel == "s4d":
            self.ssm = S4D(d, C, b.state_size, b.s4d_init, rngs, impl=b.ssm_impl,
                           chunk=min(b.ssm_chunk, cfg.block_len))
        else:
            self.ssm = ImplicitFilter(d, C, b.filter_emb_dim, b.filter_hidden, b.filter_sin_freq,
                                     cfg.seq_len, rngs)
        if b.variant in ("SH", "MF"):  # "lift to heads": Dense 1 -> H on a trailing unit axis
            self.lift_w = param(rngs, normal(1.0), (H,), ("heads",))
            self.lift_b = nnx.Param(jnp.zeros((H,), jnp.float32), axes=("heads",))
        if b.variant == "MF":
            S = b.num_context_states
            self.init_context = param(rngs, normal(0.1), (S, d), (None, "embed"))
            self.context_ids = param(rngs, normal(1.0), (S, d), (None, "embed"))
        self.ctx_norm = RMSNorm(d, rngs)
        self.ctx_k = HeadProjection(d, H, hd, rngs)
        self.ctx_v = HeadProjection(d, H, hd, rngs)
        self.cross_scale = HeadScale(H, rngs)
        self.post = PostAttn(d, H, hd, cfg.mlp_dim, parts=2, rngs=rngs)

    # -- forward -------------------------------------------------------------------------------

    def _lift(self, y: jax.Array) -> jax.Array:
        """(..., 1) -> (..., H): y_H[..., h] = w_h y + beta_h."""
        return y * self.lift_w[...] + self.lift_b[...]

    def _ctx_kv(self, ctx: jax.Array, ids: jax.Array | None = None):
        """Per-head contexts (..., d, H) -> keys, values (..., H, hd)."""
        c = self.ctx_norm(ctx, axis=-2)
        if ids is not None:
            c = c + ids[..., None].astype(c.dtype)
        k = jnp.einsum("...dh,dhk->...hk", c, self.ctx_k.kernel[...].astype(c.dtype))
        v = jnp.einsum("...dh,dhk->...hk", c, self.ctx_v.kernel[...].astype(c.dtype))
        return attn.l2_normalize(k), v

    def __call__(self, x: jax.Array, cache: dict, live: jax.Array, drop: Dropout | None):
        cfg, b = self.cfg, self.cfg.bst
        W, T = cfg.block_len, x.shape[1]
        nb = T // W
        dt = x.dtype
        a_self, (_, _, q2, *_), new_cache = self.attn(x, cache, live, drop)
        keep = live[:, None, None]

        # SSM over the whole sequence (not per window: docs/model_spec.md 4), carry read through stop_gradient.
        carry = None
        if b.carry and b.kernel == "s4d":
            h = jax.lax.stop_gradient(cache["h_re"] + 1j * cache["h_im"]).astype(jnp.complex64)
            carry = jnp.where(keep, h, 0)
        elif b.carry:
            if cache["u"].shape[1] != T:
                raise ValueError(f"the unstruct cache holds sequences of {cache['u'].shape[1]} tokens but the "
                                 f"input has T={T}; build it with Cache.zeros(cfg, batch, seq_len={T})")
            carry = jnp.where(keep, jax.lax.stop_gradient(cache["u"]), 0).astype(dt)
        mf_ends = b.variant == "MF" and b.kernel == "s4d" and b.ssm_impl == "chunked"
        if mf_ends:  # MF reads only the window-end positions: compute the SSM there alone
            y, carry_new = self.ssm.window_ends(x, carry, W)  # (B, nb, d, S) float32
        else:
            y, carry_new = self.ssm(x, carry)  # (B, T, d, C) float32
        if b.carry and b.kernel == "s4d":
            new_cache["h_re"] = jax.lax.stop_gradient(jnp.real(carry_new)).astype(jnp.float32)
            new_cache["h_im"] = jax.lax.stop_gradient(jnp.imag(carry_new)).astype(jnp.float32)
        elif b.carry:
            new_cache["u"] = jax.lax.stop_gradient(carry_new)

        q2b = attn.to_blocks(q2, W)  # (B, nb, W, H, hd)
        if b.variant in ("SH", "MH"):
            ctx = (self._lift(y) if b.variant == "SH" else y).astype(dt)  # (B, T, d, H)
            kc, vc = self._ctx_kv(ctx)
            mask = attn.causal_mask(W, strict=cfg.mask == "strict")
            if cfg.attention_impl == "cudnn":  # inclusive mask: no row is fully masked
                cross = attn.block_cross_attention_flash(q2b, attn.to_blocks(kc, W), attn.to_blocks(vc, W),
                                                         self.cross_scale())
            else:
                dropout = attn_dropout(drop, 4, (nb, cfg.num_heads, W, W))
                cross = attn.attend(q2b, attn.to_blocks(kc, W), attn.to_blocks(vc, W), self.cross_scale(),
                                    mask=mask, dropout=dropout)
        else:  # MF
            ends = jnp.swapaxes(y if mf_ends else y[:, W - 1::W], -1, -2)  # (B, nb, S, d): window ends
            init = jnp.broadcast_to(self.init_context[...][None], ends[:, 0].shape)
            if b.carry:  # window 0 sees the previous sequence's last context
                prev = jnp.where(keep, jax.lax.stop_gradient(cache["ctx"]), init)
                new_cache["ctx"] = jax.lax.stop_gradient(ends[:, -1])
            else:
                prev = init
            ctx = jnp.concatenate([prev[:, None], ends[:, :-1]], axis=1)  # shifted by one window
            kc, vc = self._ctx_kv(self._lift(ctx[..., None]).astype(dt), self.context_ids[...])
            dropout = attn_dropout(drop, 4, (nb, cfg.num_heads, W, b.num_context_states))
            cross = attn.attend(q2b, kc, vc, self.cross_scale(), dropout=dropout)  # no mask
        cross = cross.reshape(a_self.shape)
        return self.post(x, [a_self, cross], drop=drop, site=3), new_cache


def cache_spec(cfg: ModelConfig, batch: int, seq_len: int) -> dict:
    """The XL cache, plus with `bst.carry` the SSM carry (S4D: the complex state after the last
    token, stored as two float32 arrays, portable through Orbax; unstruct: the previous
    sequence's SSM input) and for MF the previous sequence's last context states."""
    shapes = xl_cache_shape(cfg, batch)
    b = cfg.bst
    if b.carry and b.kernel == "s4d":
        n2 = b.state_size // 2
        shapes["h_re"] = jax.ShapeDtypeStruct((batch, cfg.d_model, n2), jnp.float32)
        shapes["h_im"] = jax.ShapeDtypeStruct((batch, cfg.d_model, n2), jnp.float32)
    if b.carry and b.kernel == "unstruct":
        shapes["u"] = jax.ShapeDtypeStruct((batch, seq_len, cfg.d_model), jnp.dtype(cfg.dtype))
    if b.carry and b.variant == "MF":
        shapes["ctx"] = jax.ShapeDtypeStruct((batch, b.num_context_states, cfg.d_model), jnp.float32)
    return shapes


def check(cfg: ModelConfig) -> None:
    """The model.bst section (checked whether or not the stack has a BST layer, so a job does not
    turn invalid when a layer index list changes)."""
    b = cfg.bst
    for key in ("state_size", "num_context_states", "filter_hidden", "filter_sin_freq", "ssm_chunk"):
        if getattr(b, key) <= 0:
            raise ConfigError(f"model.bst.{key}: must be > 0, got {getattr(b, key)}")
    if b.state_size % 2:
        raise ConfigError(f"model.bst.state_size: must be even (N/2 complex modes), got {b.state_size}")
    # Hyena's positional features are [t, cos(f_j t), -sin(f_j t)] for j < J: 1 + 2J columns.
    if b.filter_emb_dim < 3 or b.filter_emb_dim % 2 == 0:
        raise ConfigError(f"model.bst.filter_emb_dim: must be odd and >= 3 (1 + 2J), got {b.filter_emb_dim}")
    if cfg.block_len % min(b.ssm_chunk, cfg.block_len):
        raise ConfigError(f"model.bst.ssm_chunk: {b.ssm_chunk} must divide model.block_len W={cfg.block_len}")


def label(cfg: ModelConfig) -> str:
    return f"BST:{cfg.bst.variant}:{'S4' if cfg.bst.kernel == 's4d' else 'unstruct'}"


def exact_in_blocks(cfg: ModelConfig) -> bool:
    """Only the S4D carry is exact at any call length: an unstructured filter has the call's
    support (a W-long call sees W taps), and without the carry a call sees only itself."""
    return cfg.bst.kernel == "s4d" and cfg.bst.carry


registry.register(registry.LayerKind(name="bst", module=BSTLayer, cache_spec=cache_spec, flops=flops.bst_flops,
                                     label=label, check=check, exact_in_blocks=exact_in_blocks))

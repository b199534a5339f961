"""Attention math as plain functions: the masked ("safe") softmax, T5 relative buckets, and
block (sliding-window) attention over the current and previous block (MODEL_SPEC 2.5-2.7).

Conventions: q, k, v are (..., Q|K, H, hd); logits are (..., H, Q, K). Keys and queries arrive
L2-normalised; `alpha` (H,) is the learned per-head scale applied after the bias is added.
A fully masked row outputs exactly 0 (never the mean of the values, which is what
`jax.nn.dot_product_attention` does and which would leak future context states).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_NEG = -1e30


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def masked_softmax(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax over the last axis restricted to `mask`; rows with nothing visible are all 0."""
    logits = logits.astype(jnp.float32)
    if mask is None:
        return jax.nn.softmax(logits, axis=-1)
    masked = jnp.where(mask, logits, _NEG)
    m = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
    e = jnp.where(mask, jnp.exp(masked - m), 0.0)
    s = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(s > 0, s, 1.0)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, alpha: jax.Array,
           bias: jax.Array | None = None, mask: jax.Array | None = None,
           dropout: tuple[jax.Array, float] | None = None) -> jax.Array:
    """softmax(alpha_h (q.k + b)) v with q (..., Q, H, hd), k/v (..., K, H, hd) -> (..., Q, H, hd).

    bias and mask broadcast against logits (..., H, Q, K). dropout: (keep mask, rate) on probs.
    """
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias
    logits = logits * alpha.astype(jnp.float32)[:, None, None]
    p = masked_softmax(logits, mask)
    if dropout is not None:
        keep, rate = dropout
        p = jnp.where(keep, p / (1.0 - rate), 0.0)
    return jnp.einsum("...hqk,...khd->...qhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32
                      ).astype(v.dtype)


# --------------------------------------------------------------------------------------------
# Relative positions (T5, unidirectional)


def t5_bucket(n: jax.Array, num_buckets: int = 32, max_distance: int = 128) -> jax.Array:
    """Bucket of distance n = q_pos - k_pos >= 0: n below num_buckets/2, then log-spaced to max_distance."""
    exact = num_buckets // 2
    n = jnp.maximum(n, 0)
    log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
    large = jnp.minimum(num_buckets - 1, exact + (log_ratio * (num_buckets - exact)).astype(jnp.int32))
    return jnp.where(n < exact, n, large)


def window_distances(W: int) -> jax.Array:
    """(W, 2W): q_pos - k_pos for query q (at W + q in [prev; cur]) and key k of [prev; cur]."""
    return (W + jnp.arange(W))[:, None] - jnp.arange(2 * W)[None, :]


def window_mask(W: int, strict: bool) -> jax.Array:
    """(W, 2W) bool. Inclusive: a token sees itself and the W tokens before it. Strict (meliad):
    exactly the W tokens strictly before it."""
    n = window_distances(W)
    lo = 1 if strict else 0
    return (n >= lo) & (n <= W)


def window_bias(table: jax.Array, W: int, max_distance: int) -> jax.Array:
    """T5 bias for block attention: table (H, buckets) -> (H, W, 2W)."""
    buckets = t5_bucket(window_distances(W), table.shape[-1], max_distance)
    return table[:, buckets]


def causal_mask(W: int, strict: bool) -> jax.Array:
    """(W, W) in-block mask for SH/MH cross-attention to context states: k <= q (k < q if strict)."""
    q = jnp.arange(W)[:, None]
    k = jnp.arange(W)[None, :]
    return k < q if strict else k <= q


# --------------------------------------------------------------------------------------------
# Block attention


def to_blocks(x: jax.Array, W: int) -> jax.Array:
    """(B, T, ...) -> (B, T/W, W, ...)."""
    return x.reshape(x.shape[0], x.shape[1] // W, W, *x.shape[2:])


def with_previous_block(x: jax.Array, prev: jax.Array) -> jax.Array:
    """x (B, nb, W, ...), prev (B, W, ...) -> (B, nb, 2W, ...): block i next to block i-1
    (block 0 next to `prev`, the XL cache)."""
    shifted = jnp.concatenate([prev[:, None], x[:, :-1]], axis=1)
    return jnp.concatenate([shifted, x], axis=2)


def prev_valid_mask(prev_valid: jax.Array, nb: int, W: int) -> jax.Array:
    """(B, nb, 1, 1, 2W) key mask: block 0's previous-block keys are visible only where the
    cache is valid (not a document start); every other block's are always visible."""
    first = jnp.arange(nb)[None, :, None] == 0  # (1, nb, 1)
    prev_ok = jnp.where(first, prev_valid[:, None, None], True)  # (B, nb, 1)
    keys = jnp.concatenate([jnp.broadcast_to(prev_ok, prev_ok.shape[:2] + (W,)),
                            jnp.ones(prev_ok.shape[:2] + (W,), bool)], axis=-1)
    return keys[:, :, None, None, :]


def block_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_prev: jax.Array, v_prev: jax.Array,
                         prev_valid: jax.Array, alpha: jax.Array, bias: jax.Array, W: int, strict: bool,
                         dropout: tuple[jax.Array, float] | None = None) -> jax.Array:
    """Sliding-window causal attention, one block at a time over [previous block; block].

    q, k, v (B, T, H, hd); k_prev, v_prev (B, W, H, hd) the XL cache; prev_valid bool[B];
    bias (H, W, 2W). Returns (B, T, H, hd).
    """
    B, T = q.shape[:2]
    nb = T // W
    kc = with_previous_block(to_blocks(k, W), k_prev)  # (B, nb, 2W, H, hd)
    vc = with_previous_block(to_blocks(v, W), v_prev)
    mask = window_mask(W, strict)[None, None, None] & prev_valid_mask(prev_valid, nb, W)
    out = attend(to_blocks(q, W), kc, vc, alpha, bias=bias[None, None], mask=mask, dropout=dropout)
    return out.reshape(q.shape)

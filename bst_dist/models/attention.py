"""Attention math as plain functions: the masked ("safe") softmax, T5 relative buckets, and
block (sliding-window) attention over the current and previous block (docs/model_spec.md,
section 1).

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


def block_self_attention_flash(q: jax.Array, k: jax.Array, v: jax.Array, k_prev: jax.Array, v_prev: jax.Array,
                               prev_valid: jax.Array, alpha: jax.Array, bias: jax.Array, W: int,
                               implementation: str = "cudnn") -> jax.Array:
    """`block_self_attention` with the inclusive mask through a fused (flash) kernel:
    `jax.nn.dot_product_attention(implementation=...)` over blocks, queries (B*nb, W, H, hd)
    against [previous block; block] keys (B*nb, 2W, H, hd).

    Same arguments and result as `block_self_attention(..., strict=False, dropout=None)`. The
    per-head scale alpha is folded into the queries and the bias (softmax(alpha (q.k + b)) =
    softmax((alpha q).k + alpha b)), the kernel's own scale is 1. The bias handed to the kernel is
    one (1, H, W, 2W) array shared by every block and lane: cuDNN returns the bias gradient only
    for a bias broadcast over the batch (a per-row bias silently gets a zero gradient), so the
    per-lane "previous block invalid" mask (document start, no XL cache) is not put in the bias.
    Instead block 0 is also attended against its own W keys alone, and each lane takes that result
    where its previous block is invalid (a second, small call: 1/(2 nb) more attention work).
    The inclusive mask never leaves a row fully masked (a token always sees itself), so the
    kernel's behaviour on such rows (a mean of the values) never arises; the strict mask must keep
    the exact XLA path. Attention dropout is not supported here.
    """
    B, T, H, hd = q.shape
    nb = T // W
    dt = q.dtype
    a = alpha.astype(jnp.float32)
    qb = (to_blocks(q, W).astype(jnp.float32) * a[:, None]).astype(dt)  # (B, nb, W, H, hd)
    kb, vb = to_blocks(k, W), to_blocks(v, W)
    kc = with_previous_block(kb, k_prev.astype(k.dtype)).reshape(B * nb, 2 * W, H, hd)
    vc = with_previous_block(vb, v_prev.astype(v.dtype)).reshape(B * nb, 2 * W, H, hd)
    sb = (bias.astype(jnp.float32) * a[:, None, None])  # (H, W, 2W): alpha b
    mask = window_mask(W, strict=False)  # (W, 2W)
    sdpa = lambda qq, kk, vv, bb, mm: jax.nn.dot_product_attention(
        qq, kk, vv, bias=bb[None].astype(dt), mask=mm[None, None], scale=1.0, implementation=implementation)
    out = sdpa(qb.reshape(B * nb, W, H, hd), kc, vc, sb, mask).reshape(B, nb, W, H, hd)
    # block 0 against its own keys only: what a lane sees when its previous block is invalid
    out0 = sdpa(qb[:, 0], kb[:, 0], vb[:, 0], sb[:, :, W:], mask[:, W:])  # (B, W, H, hd)
    first = jnp.where(prev_valid[:, None, None, None], out[:, 0], out0)
    out = jnp.concatenate([first[:, None], out[:, 1:]], axis=1)
    return out.reshape(q.shape)


def window_bias_toeplitz(table: jax.Array, W: int, max_distance: int) -> jax.Array:
    """`window_bias` (same values, (H, W, 2W)) built without a (W, 2W) gather, so that its gradient
    is no scatter-add: the gradient of the gather sends W*2W*H updates into H*32 table entries,
    which serialises on the GPU (1.4 ms per layer at W=512 on an H100). Here the bias depends on
    the distance n = W + q - k only: a gather of a short vector vec[m] = table[bucket(2W - m)],
    m in [0, 3W], then a Toeplitz expansion by broadcast + reshape + slice (row q shifted by q),
    whose transpose is a reduction (the sum along each diagonal)."""
    H = table.shape[0]
    m = jnp.arange(3 * W + 1)
    vec = table[:, t5_bucket(2 * W - m, table.shape[-1], max_distance)]  # (H, 3W+1)
    rows = jnp.broadcast_to(vec[:, None, :], (H, W, 3 * W + 1)).reshape(H, W * (3 * W + 1))
    skew = rows[:, : W * 3 * W].reshape(H, W, 3 * W)  # skew[h, q, j] = vec[h, j - q]  (j >= q)
    return skew[:, :, W:]  # j = k + W: vec[k + W - q] = table[bucket(W + q - k)]


def block_cross_attention_flash(q: jax.Array, k: jax.Array, v: jax.Array, alpha: jax.Array,
                                implementation: str = "cudnn") -> jax.Array:
    """`attend(q, k, v, alpha, mask=causal_mask(W, strict=False))` for the BST SH/MH
    cross-attention (each query sees the context states at positions <= its own in its block)
    through a fused kernel. q, k, v (B, nb, W, H, hd) -> (B, nb, W, H, hd). No bias, so no
    batch-broadcast restriction; alpha is folded into the queries as in
    `block_self_attention_flash`; inclusive mask only (a query always sees its own position, so
    no row is fully masked), no attention dropout."""
    B, nb, W, H, hd = q.shape
    qs = (q.astype(jnp.float32) * alpha.astype(jnp.float32)[:, None]).astype(q.dtype)
    flat = lambda x: x.reshape(B * nb, W, H, hd)
    out = jax.nn.dot_product_attention(flat(qs), flat(k), flat(v), is_causal=True, scale=1.0,
                                       implementation=implementation)
    return out.reshape(q.shape)

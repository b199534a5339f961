"""Cross-entropy of the tied output head without materialising the (B, T, V) logits.

`chunked_cross_entropy(x, embed, targets, mask, ...)` equals
`step.cross_entropy(model.logits(x), targets, mask)` (summed nats over mask-in targets; logits
= x E^T / sqrt(d) in float32, padded ids at -1e9) but runs over chunks of `chunk` tokens: the
forward keeps one float32 log-sum-exp per token; the backward recomputes each chunk's logits
and forms its gradient there (a custom VJP), so the largest buffer is (chunk, V) instead of
several (B*T, V) float32 arrays. The embedding gradient is accumulated in float32.
Cost: one extra head matmul (the recomputation), 4 instead of 3.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp


def _chunk_logits(xc, Eb, scale: float, vocab_size: int):
    logits = jnp.einsum("bnd,vd->bnv", xc, Eb, preferred_element_type=jnp.float32) * scale
    if Eb.shape[0] > vocab_size:
        logits = jnp.where(jnp.arange(Eb.shape[0]) < vocab_size, logits, -1e9)
    return logits


def _split(a, chunk):
    """(B, T, ...) -> (T/chunk, B, chunk, ...): the scan runs along time, so the batch axis keeps
    its sharding (a scan over a sharded axis would gather it on every device)."""
    return jnp.moveaxis(a.reshape(a.shape[0], a.shape[1] // chunk, chunk, *a.shape[2:]), 1, 0)


def _unsplit(a):
    """(T/chunk, B, chunk, ...) -> (B, T, ...)."""
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ce(x, E, targets, mask, scale, vocab_size, chunk):
    return _ce_fwd(x, E, targets, mask, scale, vocab_size, chunk)[0]


def _ce_fwd(x, E, targets, mask, scale, vocab_size, chunk):
    Eb = E.astype(x.dtype)

    def body(total, xs):
        xc, tc, mc = xs
        logits = _chunk_logits(xc, Eb, scale, vocab_size)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return total + jnp.sum((lse - picked) * mc), lse

    total, lse = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                              (_split(x, chunk), _split(targets, chunk), _split(mask, chunk)))
    return total, (x, E, targets, mask, lse)


def _ce_bwd(scale, vocab_size, chunk, res, g):
    x, E, targets, mask, lse = res
    Eb = E.astype(x.dtype)

    def body(dE, xs):
        xc, tc, mc, lc = xs
        logits = _chunk_logits(xc, Eb, scale, vocab_size)
        p = jnp.exp(logits - lc[..., None])
        onehot = jnp.arange(Eb.shape[0]) == tc[..., None]
        dlogits = ((p - onehot) * (mc * g * scale)[..., None]).astype(x.dtype)  # d nats / d (x E^T)
        dx = jnp.einsum("bnv,vd->bnd", dlogits, Eb, preferred_element_type=jnp.float32).astype(x.dtype)
        dE = dE + jnp.einsum("bnv,bnd->vd", dlogits, xc, preferred_element_type=jnp.float32)
        return dE, dx

    dE, dx = jax.lax.scan(body, jnp.zeros(E.shape, jnp.float32),
                          (_split(x, chunk), _split(targets, chunk), _split(mask, chunk), lse))
    return _unsplit(dx), dE.astype(E.dtype), None, jnp.zeros_like(mask)


_ce.defvjp(_ce_fwd, _ce_bwd)


def chunked_cross_entropy(x: jax.Array, embed: jax.Array, targets: jax.Array, mask: jax.Array, *,
                          vocab_size: int, chunk: int = 2048) -> jax.Array:
    """Summed nats over mask-in targets. x (B, T, d) final-norm features (compute dtype), embed
    (V_padded, d) the tied table (float32 master weights), targets int (B, T), mask (B, T).
    Each scan step covers `chunk` tokens of every row (chunk // B per row, at least 1, a divisor
    of T), so the batch axis stays sharded."""
    B, T, d = x.shape
    per_row = max(1, chunk // B)
    per_row = max(c for c in range(1, min(per_row, T) + 1) if T % c == 0)
    return _ce(x, embed, targets.astype(jnp.int32), mask.astype(jnp.float32), 1.0 / math.sqrt(d), vocab_size,
               per_row)

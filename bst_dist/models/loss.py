"""The tied output head and its next-token cross-entropy, the one implementation used by the
train step, the evaluators and the tests.

    logits = x E^T / sqrt(d)            (float32; padded vocabulary ids at -1e9)
    nll_t  = logsumexp(logits_t) - logits_t[target_t]

`head_logits` materialises the (B, T, V) logits (generation, inspection). `token_nll` and
`masked_nll_sum` never do: they run over chunks of tokens, keeping one float32 log-sum-exp per
token. `masked_nll_sum` (the training loss) has a custom VJP whose backward recomputes each
chunk's logits and forms its gradient there, so the largest buffer is (chunk, V) instead of
several (B*T, V) float32 arrays; the embedding gradient is accumulated in float32. Cost: one
extra head matmul (the recomputation), 4 instead of 3.

Chunks run along time (every row contributes `chunk // B` tokens to each scan step), so the
batch axis keeps its sharding: a scan over a sharded axis would gather it on every device.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

PAD_LOGIT = -1e9  # logit of the padded vocabulary ids (never predicted, never a target)


def head_logits(x: jax.Array, embed: jax.Array, vocab_size: int) -> jax.Array:
    """x (..., n, d) compute dtype, embed (V_padded, d) -> (..., n, V_padded) float32."""
    E = embed.astype(x.dtype)
    logits = jnp.einsum("...nd,vd->...nv", x, E, preferred_element_type=jnp.float32) / math.sqrt(x.shape[-1])
    if E.shape[0] > vocab_size:
        logits = jnp.where(jnp.arange(E.shape[0]) < vocab_size, logits, PAD_LOGIT)
    return logits


def nll_from_logits(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(nll, lse): per-token nats -log softmax(logits)[target] and the log-sum-exp, (...)."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked, lse


def _split(a, chunk):
    """(B, T, ...) -> (T/chunk, B, chunk, ...)."""
    return jnp.moveaxis(a.reshape(a.shape[0], a.shape[1] // chunk, chunk, *a.shape[2:]), 1, 0)


def _unsplit(a):
    """(T/chunk, B, chunk, ...) -> (B, T, ...)."""
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])


def _per_row(chunk: int, B: int, T: int) -> int:
    """Tokens per row in one scan step: chunk // B (at least 1), rounded down to a divisor of T."""
    per_row = max(1, chunk // B)
    return max(c for c in range(1, min(per_row, T) + 1) if T % c == 0)


def _scan_nll(x, E, targets, vocab_size, per_row):
    """(nll, lse), each (B, T) float32, one chunk of logits at a time."""
    def body(_, xs):
        xc, tc = xs
        return None, nll_from_logits(head_logits(xc, E, vocab_size), tc)

    _, (nll, lse) = jax.lax.scan(body, None, (_split(x, per_row), _split(targets, per_row)))
    return _unsplit(nll), _unsplit(lse)


def token_nll(x: jax.Array, embed: jax.Array, targets: jax.Array, *, vocab_size: int,
              chunk: int = 2048) -> jax.Array:
    """Per-token nats (B, T) float32 of the next-token targets (B, T) from final-norm features
    x (B, T, d); no gradient rule of its own (use `masked_nll_sum` to train)."""
    B, T, _ = x.shape
    return _scan_nll(x, embed, targets.astype(jnp.int32), vocab_size, _per_row(chunk, B, T))[0]


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _nll_sum(x, E, targets, mask, vocab_size, per_row):
    return _nll_sum_fwd(x, E, targets, mask, vocab_size, per_row)[0]


def _nll_sum_fwd(x, E, targets, mask, vocab_size, per_row):
    nll, lse = _scan_nll(x, E, targets, vocab_size, per_row)
    return jnp.sum(nll * mask), (x, E, targets, mask, lse)


def _nll_sum_bwd(vocab_size, per_row, res, g):
    x, E, targets, mask, lse = res
    Eb = E.astype(x.dtype)
    scale = 1.0 / math.sqrt(x.shape[-1])

    def body(dE, xs):
        xc, tc, mc, lc = xs
        p = jnp.exp(head_logits(xc, E, vocab_size) - lc[..., None])  # softmax, from the saved lse
        onehot = jnp.arange(E.shape[0]) == tc[..., None]
        dlogits = ((p - onehot) * (mc * g * scale)[..., None]).astype(x.dtype)  # d nats / d (x E^T)
        dx = jnp.einsum("bnv,vd->bnd", dlogits, Eb, preferred_element_type=jnp.float32).astype(x.dtype)
        dE = dE + jnp.einsum("bnv,bnd->vd", dlogits, xc, preferred_element_type=jnp.float32)
        return dE, dx

    dE, dx = jax.lax.scan(body, jnp.zeros(E.shape, jnp.float32),
                          (_split(x, per_row), _split(targets, per_row), _split(mask, per_row),
                           _split(lse, per_row)))
    return _unsplit(dx), dE.astype(E.dtype), None, jnp.zeros_like(mask)


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)


def masked_nll_sum(x: jax.Array, embed: jax.Array, targets: jax.Array, mask: jax.Array, *,
                   vocab_size: int, chunk: int = 2048) -> jax.Array:
    """Summed nats over mask-in targets (the training loss before dividing by the token count).
    x (B, T, d) final-norm features (compute dtype), embed (V_padded, d) the tied table (float32
    master weights), targets int (B, T), mask (B, T). Differentiable in x and embed."""
    B, T, _ = x.shape
    return _nll_sum(x, embed, targets.astype(jnp.int32), mask.astype(jnp.float32), vocab_size,
                    _per_row(chunk, B, T))

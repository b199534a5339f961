"""Next-token sampling as plain functions over logits (B, V) float32.

Order: temperature, then top-k, then top-p (nucleus) on what is left, then a categorical draw.
Greedy decoding is top_k=1 (temperature is then irrelevant).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


class SamplingError(ValueError):
    """A sampling parameter outside its allowed range (a one-line message)."""


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature > 0:
        raise SamplingError(f"temperature {temperature}: must be > 0 (for greedy decoding use top_k=1)")
    if top_k is not None and top_k < 1:
        raise SamplingError(f"top_k {top_k}: must be >= 1 (or unset for no top-k cut)")
    if top_p is not None and not 0 < top_p <= 1:
        raise SamplingError(f"top_p {top_p}: must be in (0, 1]")


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits per row (ties at the k-th value kept), others -inf."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """Keep the smallest set of most likely ids whose probability reaches p (always >= 1 id)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each id
    keep_sorted = before < p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def filter_logits(logits: jax.Array, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    x = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < x.shape[-1]:
        x = top_k_mask(x, top_k)
    if top_p is not None and top_p < 1:
        x = top_p_mask(x, top_p)
    return x


def sample(key: jax.Array, logits: jax.Array, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None) -> jax.Array:
    """(B, V) logits -> (B,) int32 ids."""
    if top_k == 1:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = filter_logits(logits, temperature, top_k, top_p)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)

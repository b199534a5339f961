"""Building blocks shared by every layer kind (docs/model_spec.md, section 1): RMS norm, the KVQ
projection with L2-normalised keys and queries, the T5 relative-position table, the
concatenate-then-project output with the FFN, and per-lane dropout.

Every parameter carries logical axis names in its `axes` metadata; bst_dist.parallel maps them
onto the mesh. Parameters are float32 (master weights); `dtype` is the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from bst_dist.models.attention import l2_normalize

fan_in_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str | None, ...], **init_kw) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, jnp.float32, **init_kw), axes=axes)


def normal(std: float):
    return jax.nn.initializers.normal(std)


# --------------------------------------------------------------------------------------------
# Dropout keyed per lane: masks depend on (seed, step, lane, layer, site) only, never on the
# mesh or the number of processes.


@dataclass(frozen=True)
class Dropout:
    keys: jax.Array  # (B,) typed PRNG keys, one per lane
    rate: float
    attn_rate: float

    def mask(self, site: int, shape_per_row: tuple[int, ...], rate: float) -> jax.Array:
        return jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, site), 1.0 - rate,
                                                       shape_per_row))(self.keys)

    def apply(self, x: jax.Array, site: int) -> jax.Array:
        if self.rate <= 0.0:
            return x
        keep = self.mask(site, x.shape[1:], self.rate)
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)

    def for_layer(self, layer: int) -> "Dropout":
        return Dropout(jax.vmap(lambda k: jax.random.fold_in(k, 1000 + layer))(self.keys), self.rate,
                       self.attn_rate)


def maybe_dropout(drop: Dropout | None, x: jax.Array, site: int) -> jax.Array:
    return x if drop is None else drop.apply(x, site)


def attn_dropout(drop: Dropout | None, site: int, probs_shape_per_row: tuple[int, ...]):
    """(keep mask, rate) for attention probabilities, or None."""
    if drop is None or drop.attn_rate <= 0.0:
        return None
    return drop.mask(site, probs_shape_per_row, drop.attn_rate), drop.attn_rate


# --------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """LN(x) = x rsqrt(mean(x^2) + 1e-6) g over the last axis (`axis` to normalise another)."""

    def __init__(self, d: int, rngs: nnx.Rngs):
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32), axes=("norm",))

    def __call__(self, x: jax.Array, axis: int = -1) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + 1e-6)
        g = self.scale[...]
        if axis != -1 and axis != x.ndim - 1:
            g = g.reshape(g.shape + (1,) * (x.ndim - 1 - (axis % x.ndim)))
        return (y * g).astype(x.dtype)


class HeadProjection(nnx.Module):
    """Dense d -> (H, hd), no bias: the W_K / W_V / W_Q of docs/model_spec.md, section 1"""

    def __init__(self, d: int, H: int, hd: int, rngs: nnx.Rngs):
        self.kernel = param(rngs, jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                                         in_axis=0, out_axis=(1, 2)),
                            (d, H, hd), ("embed", "heads", "kv"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,dhk->...hk", x, self.kernel[...].astype(x.dtype))


class KVQ(nnx.Module):
    """X^ = LN(X) [+ position ids] -> dropout -> K, V, Q (and Q2), keys/queries L2-normalised."""

    def __init__(self, d: int, H: int, hd: int, with_q2: bool, rngs: nnx.Rngs):
        self.norm = RMSNorm(d, rngs)
        self.k = HeadProjection(d, H, hd, rngs)
        self.v = HeadProjection(d, H, hd, rngs)
        self.q = HeadProjection(d, H, hd, rngs)
        self.q2 = HeadProjection(d, H, hd, rngs) if with_q2 else None

    def __call__(self, x: jax.Array, ids: jax.Array | None = None, drop: Dropout | None = None, site: int = 0):
        xh = self.norm(x)
        if ids is not None:
            xh = xh + ids.astype(xh.dtype)
        xh = maybe_dropout(drop, xh, site)
        k = l2_normalize(self.k(xh))
        q = l2_normalize(self.q(xh))
        q2 = l2_normalize(self.q2(xh)) if self.q2 is not None else None
        return k, self.v(xh), q, q2


class HeadScale(nnx.Module):
    """alpha_h: the learned per-head logit scale, initialised to 1."""

    def __init__(self, H: int, rngs: nnx.Rngs):
        self.alpha = nnx.Param(jnp.ones((H,), jnp.float32), axes=("heads",))

    def __call__(self) -> jax.Array:
        return self.alpha[...]


class RelativeBias(nnx.Module):
    """T5 relative-position table (H, buckets), self-attention only."""

    def __init__(self, H: int, buckets: int, rngs: nnx.Rngs):
        self.table = nnx.Param(jnp.zeros((H, buckets), jnp.float32), axes=("heads", None))

    def __call__(self) -> jax.Array:
        return self.table[...]


class FFN(nnx.Module):
    """W2 relu(W1 z), no biases."""

    def __init__(self, d: int, F: int, rngs: nnx.Rngs):
        self.w1 = param(rngs, fan_in_init, (d, F), ("embed", "mlp"))
        self.w2 = param(rngs, fan_in_init, (F, d), ("mlp", "embed"))

    def __call__(self, z: jax.Array) -> jax.Array:
        h = jax.nn.relu(z @ self.w1[...].astype(z.dtype))
        return h @ self.w2[...].astype(z.dtype)


class PostAttn(nnx.Module):
    """O = X + Dense(concat_heads(parts)); Y = O + dropout(FFN(LN(O))) (docs/model_spec.md, section 1)."""

    def __init__(self, d: int, H: int, hd: int, F: int, parts: int, rngs: nnx.Rngs):
        self.out = param(rngs, jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                                      in_axis=(0, 1, 2), out_axis=3),
                         (parts, H, hd, d), (None, "heads", "kv", "embed"))
        self.norm = RMSNorm(d, rngs)
        self.ffn = FFN(d, F, rngs)

    def __call__(self, x: jax.Array, parts: list[jax.Array], drop: Dropout | None = None, site: int = 0):
        a = jnp.stack(parts, axis=-3)  # (..., P, H, hd)
        o = x + jnp.einsum("...phk,phkd->...d", a, self.out[...].astype(x.dtype)).astype(x.dtype)
        return o + maybe_dropout(drop, self.ffn(self.norm(o)), site)

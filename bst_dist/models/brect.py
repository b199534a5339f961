"""The Block-Recurrent Transformer recurrent layer (docs/model_spec.md, section 3): S recurrent states
updated once per block by self-attention, cross-attention to the block's tokens (2W keys) and a
fixed or LSTM gate; tokens cross-attend to the states entering their block.

Everything that does not depend on the state (token projections, token self-attention) runs
for all blocks at once; only the state update is a `lax.scan` over the T/W blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bst_dist.config import ConfigError, ModelConfig
from bst_dist.models import attention as attn
from bst_dist.models import flops, registry
from bst_dist.models.block import SelfAttention, xl_cache_shape
from bst_dist.models.modules import (FFN, KVQ, Dropout, HeadScale, PostAttn, RMSNorm,
                                     normal, param)


class Gate(nnx.Module):
    """G(c, z, u). fixed: g = sigmoid(b_g), G = g c + (1-g) z (a learned EMA over blocks).
    lstm: G = sigmoid(W_f u + b_f + 1) c + sigmoid(W_i u + b_i - 1) z."""

    def __init__(self, kind: str, d: int, u_dim: int, rngs: nnx.Rngs):
        self.kind = kind
        if kind == "fixed":
            self.b_g = param(rngs, normal(0.1), (d,), ("embed",))
        else:
            scaled = jax.nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
            self.w_f = param(rngs, scaled, (u_dim, d), (None, "embed"))
            self.w_i = param(rngs, scaled, (u_dim, d), (None, "embed"))
            self.b_f = param(rngs, normal(0.1), (d,), ("embed",))
            self.b_i = param(rngs, normal(0.1), (d,), ("embed",))

    def __call__(self, c: jax.Array, z: jax.Array, u: jax.Array) -> jax.Array:
        if self.kind == "fixed":
            g = jax.nn.sigmoid(self.b_g[...]).astype(c.dtype)
            return g * c + (1 - g) * z
        f = jax.nn.sigmoid(u @ self.w_f[...].astype(u.dtype) + self.b_f[...] + 1.0).astype(c.dtype)
        i = jax.nn.sigmoid(u @ self.w_i[...].astype(u.dtype) + self.b_i[...] - 1.0).astype(c.dtype)
        return f * c + i * z


class BRecTLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, H, hd, S = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.brect.num_states
        self.attn = SelfAttention(cfg, with_q2=True, rngs=rngs)
        self.state_kvq = KVQ(d, H, hd, with_q2=True, rngs=rngs)  # separate weights from the tokens'
        self.state_ids = param(rngs, normal(1.0), (S, d), (None, "embed"))
        self.c_init = param(rngs, normal(0.1), (S, d), (None, "embed"))
        self.scale_xc = HeadScale(H, rngs)  # tokens -> states
        self.scale_cc = HeadScale(H, rngs)  # states -> states
        self.scale_cx = HeadScale(H, rngs)  # states -> tokens
        self.w_o = param(rngs, jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                                      in_axis=(0, 1, 2), out_axis=3),
                         (2, H, hd, d), (None, "heads", "kv", "embed"))
        self.gate1 = Gate(cfg.brect.gate, d, 2 * H * hd, rngs)
        if not cfg.brect.skip:  # dual: a second, FFN-fed gate
            self.norm2 = RMSNorm(d, rngs)
            self.ffn2 = FFN(d, cfg.mlp_dim, rngs)
            self.gate2 = Gate(cfg.brect.gate, d, cfg.mlp_dim, rngs)
        self.post = PostAttn(d, H, hd, cfg.mlp_dim, parts=2, rngs=rngs)

    def _update(self, c: jax.Array, kx: jax.Array, vx: jax.Array, kmask: jax.Array, q2x: jax.Array):
        """One block: c (B, S, d) float32; kx/vx (B, 2W, H, hd); kmask (B, 2W); q2x (B, W, H, hd).
        Returns (c_next, A_xc (B, W, H, hd))."""
        dt = kx.dtype
        # the horizontal direction has no dropout (meliad's mode="pure")
        kc, vc, qc, q2c = self.state_kvq(c.astype(dt), ids=self.state_ids[...])
        a_xc = attn.attend(q2x, kc, vc, self.scale_xc())
        a_cc = attn.attend(qc, kc, vc, self.scale_cc())
        a_cx = attn.attend(q2c, kx, vx, self.scale_cx(), mask=kmask[:, None, None, :])
        h = jnp.stack([a_cc, a_cx], axis=-3)  # (B, S, 2, H, hd)
        z = jnp.einsum("bsphk,phkd->bsd", h, self.w_o[...].astype(dt)).astype(jnp.float32)
        u = h.reshape(h.shape[:2] + (-1,)).astype(jnp.float32)
        c = self.gate1(c, z, u)
        if not self.cfg.brect.skip:
            f = jax.nn.relu(self.norm2(c) @ self.ffn2.w1[...])
            c = self.gate2(c, f @ self.ffn2.w2[...], f)
        return c, a_xc

    def __call__(self, x: jax.Array, cache: dict, live: jax.Array, drop: Dropout | None):
        cfg = self.cfg
        W, T = cfg.block_len, x.shape[1]
        nb = T // W
        a_xx, (k, v, q2, k_prev, v_prev, prev_valid), new_cache = self.attn(x, cache, live, drop)
        kx = attn.with_previous_block(attn.to_blocks(k, W), k_prev)  # (B, nb, 2W, H, hd)
        vx = attn.with_previous_block(attn.to_blocks(v, W), v_prev)
        kmask = attn.prev_valid_mask(prev_valid, nb, W)[:, :, 0, 0, :]  # (B, nb, 2W)
        c0 = jnp.where(live[:, None, None], jax.lax.stop_gradient(cache["state"]), self.c_init[...][None])

        c, a_xc = _scan_blocks(self, c0, (kx, vx, kmask, attn.to_blocks(q2, W)))
        new_cache["state"] = jax.lax.stop_gradient(c)
        a_xc = a_xc.reshape(a_xx.shape)
        return self.post(x, [a_xx, a_xc], drop=drop, site=3), new_cache


def _scan_blocks(layer: BRecTLayer, c0: jax.Array, xs: tuple):
    """lax.scan of `layer._update` over the block axis (axis 1 of every x) with the layer's
    parameters closed over (split/merge keeps the scan body a pure function)."""
    graphdef, state = nnx.split(layer)
    xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs)

    def body(c, x):
        m = nnx.merge(graphdef, state)
        return m._update(c, *x)

    c, ys = jax.lax.scan(body, c0, xs)
    return c, jnp.moveaxis(ys, 0, 1)


def cache_spec(cfg: ModelConfig, batch: int, seq_len: int) -> dict:
    """The XL cache plus the S recurrent states after the previous sequence's last block."""
    shapes = xl_cache_shape(cfg, batch)
    shapes["state"] = jax.ShapeDtypeStruct((batch, cfg.brect.num_states, cfg.d_model), jnp.float32)
    return shapes


def check(cfg: ModelConfig) -> None:
    if cfg.brect.num_states <= 0:
        raise ConfigError(f"model.brect.num_states: must be > 0, got {cfg.brect.num_states}")


registry.register(registry.LayerKind(
    name="brect", module=BRecTLayer, cache_spec=cache_spec, flops=flops.brect_flops,
    label=lambda cfg: f"BRecT:{cfg.brect.gate}:{'skip' if cfg.brect.skip else 'dual'}", check=check))

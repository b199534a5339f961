"""The Block Transformer ("Slide") layer: sliding-window causal self-attention over the current
and previous block, T5 relative bias, and the non-differentiable XL cache of the previous
sequence's last block (docs/model_spec.md, section 2). Transformer-XL is this layer with W = L.

`SelfAttention` is also the vertical direction of the BRecT and BST layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bst_dist.config import ModelConfig
from bst_dist.models import attention as attn
from bst_dist.models import flops, registry
from bst_dist.models.modules import KVQ, Dropout, HeadScale, PostAttn, RelativeBias, attn_dropout


def xl_cache_shape(cfg: ModelConfig, batch: int) -> dict:
    W, H, hd = cfg.block_len, cfg.num_heads, cfg.head_dim
    dt = jnp.dtype(cfg.dtype)
    return {"k": jax.ShapeDtypeStruct((batch, W, H, hd), dt), "v": jax.ShapeDtypeStruct((batch, W, H, hd), dt)}


class SelfAttention(nnx.Module):
    """Token KVQ + block self-attention with the XL cache. Returns the attention output (B,T,H,hd),
    the token keys/values (for layers that reuse them) and the new XL cache."""

    def __init__(self, cfg: ModelConfig, with_q2: bool, rngs: nnx.Rngs):
        self.cfg = cfg
        self.kvq = KVQ(cfg.d_model, cfg.num_heads, cfg.head_dim, with_q2, rngs)
        self.scale = HeadScale(cfg.num_heads, rngs)
        self.rel = RelativeBias(cfg.num_heads, cfg.rel_buckets, rngs)

    def __call__(self, x: jax.Array, cache: dict, live: jax.Array, drop: Dropout | None):
        cfg = self.cfg
        W = cfg.block_len
        k, v, q, q2 = self.kvq(x, drop=drop, site=1)
        k_prev = jax.lax.stop_gradient(cache["k"]).astype(k.dtype)
        v_prev = jax.lax.stop_gradient(cache["v"]).astype(v.dtype)
        prev_valid = live if cfg.xl_cache else jnp.zeros_like(live)
        nb = x.shape[1] // W
        dropout = attn_dropout(drop, 2, (nb, cfg.num_heads, W, 2 * W))
        # the T5 bias built by broadcast + slicing (same values as the gather in `window_bias`):
        # its gradient is a sum along diagonals, not a 4M-into-256 scatter-add (13-20 ms/step on an H100)
        bias = attn.window_bias_toeplitz(self.rel(), W, cfg.rel_max_distance)
        if cfg.attention_impl == "cudnn":  # config validation: inclusive mask, no attention dropout
            a = attn.block_self_attention_flash(q, k, v, k_prev, v_prev, prev_valid, self.scale(), bias, W,
                                                implementation="cudnn")
        else:
            a = attn.block_self_attention(q, k, v, k_prev, v_prev, prev_valid, self.scale(), bias, W,
                                          strict=cfg.mask == "strict", dropout=dropout)
        new_cache = {"k": jax.lax.stop_gradient(k[:, -W:]), "v": jax.lax.stop_gradient(v[:, -W:])}
        return a, (k, v, q2, k_prev, v_prev, prev_valid), new_cache


class BlockLayer(nnx.Module):
    """Slide / Transformer-XL layer: Y = PostAttn(X, A_self)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn = SelfAttention(cfg, with_q2=False, rngs=rngs)
        self.post = PostAttn(cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, parts=1, rngs=rngs)

    def __call__(self, x: jax.Array, cache: dict, live: jax.Array, drop: Dropout | None):
        a, _, new_cache = self.attn(x, cache, live, drop)
        return self.post(x, [a], drop=drop, site=3), new_cache


def _block_label(cfg: ModelConfig) -> str:
    return "Trsf-XL" if cfg.block_len == cfg.seq_len else "Block"


registry.register(registry.LayerKind(
    name="block", module=BlockLayer, cache_spec=lambda cfg, batch, seq_len: xl_cache_shape(cfg, batch),
    flops=flops.block_flops, label=_block_label))

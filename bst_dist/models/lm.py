"""The language model: tied embedding, a hybrid stack of Block / BST / BRecT layers from config,
final RMS norm and the tied output head scaled by 1/sqrt(d) (docs/models.md says
1/sqrt(V); meliad's decoder_stack.py divides by sqrt(ys.shape[-1]) = sqrt(d): see docs/models.md).

    model = build(cfg.model, rngs=nnx.Rngs(seed))
    cache = model.init_cache(batch_size)
    logits, cache = model(tokens, cache, doc_start)

The cache is an explicit pytree: {"valid": bool[B], "layers": [per-layer dict]}. `valid` is
False in a fresh cache; a row reads its cached values only where valid and not doc_start
(otherwise the initial values: zeros, the learned BRecT state, the learned MF context), so a
fresh cache and doc_start=True give the same result, and previous-block keys are masked out
rather than attended as zeros.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from bst_dist.config import ModelConfig
from bst_dist.errors import UserError
from bst_dist.models.block import BlockLayer
from bst_dist.models.brect import BRecTLayer
from bst_dist.models.bst import BSTLayer
from bst_dist.models.modules import Dropout, RMSNorm, maybe_dropout

LAYER_TYPES = {"block": BlockLayer, "bst": BSTLayer, "brect": BRecTLayer}


class InputError(UserError, ValueError):
    """Bad tokens, lengths or caches passed to the model (a one-line message)."""


class LM(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, remat: str = "none"):
        self.cfg = cfg
        self.remat = remat
        V, d = cfg.padded_vocab, cfg.d_model
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (V, d), jnp.float32), axes=("vocab", "embed"))
        self.layers = nnx.List([LAYER_TYPES[cfg.layer_kind(i)](cfg, rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(d, rngs)

    # -- cache ---------------------------------------------------------------------------------

    def cache_shape(self, batch_size: int, seq_len: int | None = None) -> dict:
        return cache_shape(self.cfg, batch_size, seq_len)

    def init_cache(self, batch_size: int, seq_len: int | None = None) -> dict:
        """A fresh (all-invalid) cache. seq_len only matters for unstructured-filter BST layers,
        whose carry is the previous sequence's input (default: the configured L)."""
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.cache_shape(batch_size, seq_len))

    # -- forward -------------------------------------------------------------------------------

    def check_inputs(self, tokens, cache, doc_start) -> None:
        cfg = self.cfg
        if tokens.ndim != 2:
            raise InputError(f"tokens must be int32[B, T], got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if T == 0 or T % cfg.block_len:
            raise InputError(f"tokens has T={T}; T must be a positive multiple of block_len W={cfg.block_len}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise InputError(f"tokens must be integers, got {tokens.dtype}")
        if doc_start.shape != (B,):
            raise InputError(f"doc_start must be bool[B={B}], got shape {tuple(doc_start.shape)}")
        cb = cache["valid"].shape[0]
        if cb != B:
            raise InputError(f"the cache was built for batch size {cb} but tokens have B={B}; "
                             f"use model.init_cache({B})")
        if not isinstance(tokens, jax.core.Tracer):
            lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
            if lo < 0 or hi >= cfg.vocab_size:
                raise InputError(f"token id {lo if lo < 0 else hi} out of range; allowed 0..{cfg.vocab_size - 1}")

    def features(self, tokens: jax.Array, cache: dict, doc_start: jax.Array,
                 dropout: Dropout | None = None) -> tuple[jax.Array, dict]:
        """The final-norm hidden states (B, T, d) and the new cache."""
        self.check_inputs(tokens, cache, doc_start)
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        live = cache["valid"] & ~doc_start.astype(bool)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
        new_layers = []
        for i, layer in enumerate(self.layers):
            drop = dropout.for_layer(i) if dropout is not None else None
            x, c = _call_layer(layer, x, cache["layers"][i], live, drop, self.remat)
            new_layers.append(c)
        x = maybe_dropout(dropout, self.final_norm(x), site=99)
        return x, {"valid": jnp.ones_like(cache["valid"]), "layers": new_layers}

    def logits(self, x: jax.Array) -> jax.Array:
        """(B, T, d) -> (B, T, V_padded) float32; padded ids get -1e9."""
        cfg = self.cfg
        logits = jnp.einsum("btd,vd->btv", x, self.embed[...].astype(x.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(cfg.d_model)
        if cfg.padded_vocab > cfg.vocab_size:
            logits = jnp.where(jnp.arange(cfg.padded_vocab) < cfg.vocab_size, logits, -1e9)
        return logits

    def __call__(self, tokens: jax.Array, cache: dict, doc_start: jax.Array,
                 dropout: Dropout | None = None) -> tuple[jax.Array, dict]:
        x, cache = self.features(tokens, cache, doc_start, dropout)
        return self.logits(x), cache


_REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _call_layer(layer, x, cache, live, drop, remat: str):
    if remat == "none":
        return layer(x, cache, live, drop)
    fn = nnx.remat(lambda m, x, c, l, d: m(x, c, l, d), policy=_REMAT_POLICIES[remat])
    return fn(layer, x, cache, live, drop)


def cache_shape(cfg: ModelConfig, batch_size: int, seq_len: int | None = None) -> dict:
    """The cache pytree as ShapeDtypeStructs (no model needed: the trainer shards it from this)."""
    T = cfg.seq_len if seq_len is None else seq_len
    layers = [LAYER_TYPES[cfg.layer_kind(i)].cache_shape(cfg, batch_size, T) for i in range(cfg.num_layers)]
    return {"valid": jax.ShapeDtypeStruct((batch_size,), jnp.bool_), "layers": layers}


def build(cfg: ModelConfig, rngs: nnx.Rngs, remat: str = "none") -> LM:
    return LM(cfg, rngs, remat=remat)

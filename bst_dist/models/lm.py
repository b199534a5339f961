"""The language model: tied embedding, a hybrid stack of Block / BST / BRecT layers from config,
final RMS norm and the tied output head scaled by 1/sqrt(d) (meliad's decoder_stack.py divides
by sqrt(ys.shape[-1]) = sqrt(d), not sqrt(V): docs/model_spec.md, sections 1 and 6).

    model = build(cfg.model, rngs=nnx.Rngs(seed))
    cache = model.init_cache(batch_size)                     # = Cache.zeros(cfg.model, batch_size)
    logits, cache = model(tokens, cache, doc_start)
    nats, count, cache = model.loss(tokens, targets, mask, cache, doc_start)   # training / evaluation
    nll, cache = model.token_nll(tokens, targets, cache, doc_start)            # per-token nats

The cache is an explicit pytree (models/cache.py): {"valid": bool[B], "layers": [per-layer
dict]}. A row reads its cached values only where valid and not doc_start (otherwise the initial
values: zeros, the learned BRecT state, the learned MF context), so a fresh cache and
doc_start=True give the same result, and previous-block keys are masked out rather than attended
as zeros. The head and its cross-entropy are models/loss.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bst_dist.config import ModelConfig
from bst_dist.errors import UserError
from bst_dist.models import loss as loss_lib
from bst_dist.models import registry
from bst_dist.models.cache import Cache
from bst_dist.models.modules import Dropout, RMSNorm, maybe_dropout


class InputError(UserError, ValueError):
    """Bad tokens, lengths or caches passed to the model (a one-line message)."""


class LM(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, remat: str = "none"):
        self.cfg = cfg
        self.remat = remat
        V, d = cfg.padded_vocab, cfg.d_model
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (V, d), jnp.float32), axes=("vocab", "embed"))
        self.layers = nnx.List([kind.module(cfg, rngs) for kind in registry.stack(cfg)])
        self.final_norm = RMSNorm(d, rngs)

    # -- cache ---------------------------------------------------------------------------------

    def cache_shape(self, batch_size: int, seq_len: int | None = None) -> dict:
        return Cache.spec(self.cfg, batch_size, seq_len)

    def init_cache(self, batch_size: int, seq_len: int | None = None) -> dict:
        """A fresh (all-invalid) cache: `Cache.zeros(cfg, batch_size, seq_len)`."""
        return Cache.zeros(self.cfg, batch_size, seq_len)

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
            # numpy, not jnp: under jit/grad a jnp reduction of closed-over concrete tokens is traced
            t = np.asarray(tokens)
            lo, hi = int(t.min()), int(t.max())
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
        return loss_lib.head_logits(x, self.embed[...], self.cfg.vocab_size)

    def loss(self, tokens: jax.Array, targets: jax.Array, mask: jax.Array, cache: dict, doc_start: jax.Array,
             dropout: Dropout | None = None, chunk: int = 2048) -> tuple[jax.Array, jax.Array, dict]:
        """(summed nats over mask-in targets, number of mask-in targets, new cache). The head runs
        in chunks of `chunk` tokens: the (B, T, V) logits are never materialised."""
        x, cache = self.features(tokens, cache, doc_start, dropout)
        mask = mask.astype(jnp.float32)
        nats = loss_lib.masked_nll_sum(x, self.embed[...], targets, mask, vocab_size=self.cfg.vocab_size,
                                       chunk=chunk)
        return nats, jnp.sum(mask), cache

    def token_nll(self, tokens: jax.Array, targets: jax.Array, cache: dict, doc_start: jax.Array,
                  chunk: int = 2048) -> tuple[jax.Array, dict]:
        """(per-token nats (B, T) float32, new cache), the head in chunks (for evaluation)."""
        x, cache = self.features(tokens, cache, doc_start)
        return loss_lib.token_nll(x, self.embed[...], targets, vocab_size=self.cfg.vocab_size, chunk=chunk), cache

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


def build(cfg: ModelConfig, rngs: nnx.Rngs, remat: str = "none") -> LM:
    return LM(cfg, rngs, remat=remat)

"""The cross-sequence cache: its layout and its one constructor.

A cache is a plain dict pytree {"valid": bool[B], "layers": [one dict per layer]}, each layer's
dict laid out by its kind's `cache_spec` (models/registry.py). `valid` is False in a fresh cache;
a row reads its cached values only where valid and not at a document start. The layout is what
train/checkpoint.py saves, so it stays a dict of dicts (Orbax's own tree format).

    spec = Cache.spec(cfg, batch_size)          # ShapeDtypeStructs, for shardings and restores
    cache = Cache.zeros(cfg, batch_size)        # a fresh cache (pass `sharding` to place it)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bst_dist.config import ModelConfig
from bst_dist.models import registry


class Cache:
    """Namespace for the cache's layout and constructor (the cache itself is a dict pytree)."""

    @staticmethod
    def spec(cfg: ModelConfig, batch_size: int, seq_len: int | None = None) -> dict:
        """The cache as ShapeDtypeStructs. seq_len only matters for unstructured-filter BST layers,
        whose carry is the previous sequence's input (default: the configured L)."""
        T = cfg.seq_len if seq_len is None else seq_len
        layers = [kind.cache_spec(cfg, batch_size, T) for kind in registry.stack(cfg)]
        return {"valid": jax.ShapeDtypeStruct((batch_size,), jnp.bool_), "layers": layers}

    @staticmethod
    def zeros(cfg: ModelConfig, batch_size: int, seq_len: int | None = None, sharding: Any = None) -> dict:
        """A fresh (all-invalid) cache. `sharding`: a pytree of shardings matching `spec` (the
        cache is then created in place on the mesh, inside or outside jit)."""
        shapes = Cache.spec(cfg, batch_size, seq_len)
        make = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
        if sharding is None:
            return make()
        return jax.jit(make, out_shardings=sharding)()


def cache_shape(cfg: ModelConfig, batch_size: int, seq_len: int | None = None) -> dict:
    """`Cache.spec` (the name the trainer and tools use)."""
    return Cache.spec(cfg, batch_size, seq_len)

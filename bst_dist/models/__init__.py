"""Models in Flax NNX: Block Transformer (Slide / Transformer-XL), BRecT, BST; see lm.py.
Layer kinds register themselves in registry.py; the cache is cache.py; the head and its
cross-entropy loss.py."""

from bst_dist.models.cache import Cache, cache_shape
from bst_dist.models.lm import LM, InputError, build

__all__ = ["LM", "Cache", "InputError", "build", "cache_shape"]

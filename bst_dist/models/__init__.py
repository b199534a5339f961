"""Models in Flax NNX: Block Transformer (Slide / Transformer-XL), BRecT, BST; see lm.py."""

from bst_dist.models.lm import LM, InputError, build, cache_shape

__all__ = ["LM", "InputError", "build", "cache_shape"]

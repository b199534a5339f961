"""bst_dist: distributed training of Block-State Transformers on Ray and sharded JAX."""

__version__ = "0.1.0"

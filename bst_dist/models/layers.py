"""The layer kinds of the model; importing a module registers its kind (models/registry.py)."""

from bst_dist.models import block, brect, bst  # noqa: F401

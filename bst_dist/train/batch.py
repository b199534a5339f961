"""One step's batch as a typed pytree: what the train step and the evaluators read.

    inputs    (B, T) int32    the tokens
    targets   (B, T) int32    the next tokens (they run one token past the sequence)
    loss_mask (B, T) float32  1 where a target counts (0: padding)
    doc_start (B,)   bool     the row starts a document: its cache is not read

(docs/data.md describes how the loader fills them.) `Batch.of` is the one constructor: from any
mapping with these keys (the loader's dict, which has more), optionally placing each field.
A Batch is a frozen dataclass registered as a pytree, so it passes through `jit`, `scan` and
`tree.map` like the dict it replaces, with its fields named.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    inputs: Any
    targets: Any
    loss_mask: Any
    doc_start: Any

    @classmethod
    def of(cls, fields: Mapping[str, Any], place: Callable[[str, Any], Any] | None = None) -> "Batch":
        """The Batch of `fields[name]` for each field name (other keys are ignored); `place(name,
        value)`, when given, makes each value (e.g. a global array on the mesh)."""
        missing = [f for f in FIELDS if f not in fields]
        if missing:
            raise KeyError(f"a batch needs {', '.join(FIELDS)}; missing {', '.join(missing)}")
        return cls(**{f: fields[f] if place is None else place(f, fields[f]) for f in FIELDS})

    @staticmethod
    def ndim(name: str) -> int:
        """Rank of a field: 1 for doc_start, 2 for the per-token fields."""
        return 1 if name == "doc_start" else 2


FIELDS = tuple(f.name for f in dataclasses.fields(Batch))

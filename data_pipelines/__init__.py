"""Data pipelines for bst_dist: GPT-2 tokenizer, corpora, ArrayRecord shards (prepare-data) and
the document-lane Grain loader. docs/data.md explains the lane design and the state format.

Public API (imported lazily, so that prepare-data workers do not import Grain and JAX):
  make_loader(data_cfg, *, seq_len, global_batch_size, process_index=0, process_count=1,
              split="train", seed=0, num_epochs=None, lanes=None, assignment=None) -> LaneLoader
  ensure_prepared(data_cfg) -> str
  iter_documents(prepared_dir, split) -> Iterator[(doc_id, int32 tokens)]
  prepare(corpus, src, out, ...) -> manifest dict
  DataError, EOT
"""

from data_pipelines.errors import DataError
from data_pipelines.tokenizer import EOT

_LAZY = {
    "make_loader": "data_pipelines.loader",
    "LaneLoader": "data_pipelines.loader",
    "ensure_prepared": "data_pipelines.prepared",
    "iter_documents": "data_pipelines.prepared",
    "prepare": "data_pipelines.shards",
    "LaneSave": "data_pipelines.checkpoint",
    "LaneRestore": "data_pipelines.checkpoint",
}

__all__ = ["DataError", "EOT", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data_pipelines' has no attribute {name!r}")

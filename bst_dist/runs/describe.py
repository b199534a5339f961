"""What a job builds: the layer stack and parameter counts, from shapes only (nnx.eval_shape:
a 400M-parameter config is counted without allocating it)."""

from __future__ import annotations

import math

import jax
from flax import nnx

from bst_dist.config import JobConfig, ModelConfig


def layer_label(cfg: ModelConfig, i: int) -> str:
    from bst_dist.models.registry import kind_of

    return kind_of(cfg, i).label(cfg)


def count_params(cfg: ModelConfig) -> dict:
    from bst_dist.models import build

    abstract = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
    per_layer = [sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(layer, nnx.Param)))
                 for layer in abstract.layers]
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    embed_padded = cfg.padded_vocab * cfg.d_model
    return {
        "total": total,  # with the padded (shardable) embedding
        "total_unpadded": total - (cfg.padded_vocab - cfg.vocab_size) * cfg.d_model,
        "embedding": embed_padded,
        "non_embedding": total - embed_padded,
        "per_layer": per_layer,
    }


def describe(job: JobConfig) -> dict:
    m = job.model
    counts = count_params(m)
    return {
        "name": job.name,
        "description": job.description,
        "L": m.seq_len,
        "W": m.block_len,
        "vocab": {"size": m.vocab_size, "padded": m.padded_vocab},
        "layers": [{"index": i, "kind": layer_label(m, i), "params": n} for i, n in enumerate(counts["per_layer"])],
        "params": {k: v for k, v in counts.items() if k != "per_layer"},
        "tokens_per_step": job.train.global_batch_size * m.seq_len,
    }


def format_description(d: dict) -> str:
    p = d["params"]
    lines = [f"{d['name']}: {d['description']}".rstrip(": "),
             f"  L={d['L']}  W={d['W']}  vocab={d['vocab']['size']} (padded to {d['vocab']['padded']})  "
             f"tokens/step={d['tokens_per_step']:,}",
             "  layer  kind                 params"]
    for layer in d["layers"]:
        lines.append(f"  {layer['index']:>5}  {layer['kind']:<20} {layer['params']:>12,}")
    lines.append(f"  parameters: total {p['total']:,} ({p['total'] / 1e6:.1f}M; {p['total_unpadded'] / 1e6:.1f}M "
                 f"at the unpadded vocabulary), non-embedding {p['non_embedding']:,} ({p['non_embedding'] / 1e6:.1f}M)")
    return "\n".join(lines)

"""Layer kinds declare themselves here: each kind (its own module under models/) registers the
module class, the cache it carries, its forward FLOP count, its label for `describe` and the
config checks of its section. Everything that varies by layer kind looks the kind up here, so
adding one is a new file that calls `register` plus its import in models/layers.py.

Which kind a layer index has is the config's business (`ModelConfig.layer_kind`, from the
`*_layers` index lists); the registry maps that name to the kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from bst_dist.config import ModelConfig


@dataclass(frozen=True)
class LayerKind:
    name: str  # as returned by ModelConfig.layer_kind
    module: type  # nnx.Module, constructed as module(cfg, rngs)
    # (cfg, batch, seq_len) -> {name: jax.ShapeDtypeStruct}: this layer's slot of the cache
    cache_spec: Callable[[ModelConfig, int, int], dict]
    # (cfg, T) -> forward FLOPs of one layer over one sequence of T tokens
    flops: Callable[[ModelConfig, int], float]
    # cfg -> the short name `describe` prints (e.g. "BST:SH:S4")
    label: Callable[[ModelConfig], str]
    # cfg -> None, or raises ConfigError naming the key (run for every config at load)
    check: Callable[[ModelConfig], None] = lambda cfg: None
    # cfg -> whether W-long calls with this layer's cache carried compute what one L-long call
    # does (given the XL cache): what block-state decoding needs to run W tokens at a time
    exact_in_blocks: Callable[[ModelConfig], bool] = lambda cfg: True


KINDS: dict[str, LayerKind] = {}


def register(kind: LayerKind) -> LayerKind:
    if kind.name in KINDS:
        raise ValueError(f"layer kind {kind.name!r} registered twice")
    KINDS[kind.name] = kind
    return kind


def kind_of(cfg: ModelConfig, i: int) -> LayerKind:
    """The registered kind of layer i."""
    _load()
    return KINDS[cfg.layer_kind(i)]


def stack(cfg: ModelConfig) -> list[LayerKind]:
    return [kind_of(cfg, i) for i in range(cfg.num_layers)]


def check(cfg: ModelConfig) -> None:
    """Every kind's config checks (each section is validated whether or not the stack uses it,
    so a job spec does not turn invalid when a layer index list changes)."""
    _load()
    for kind in KINDS.values():
        kind.check(cfg)


def _load() -> None:
    from bst_dist.models import layers  # noqa: F401  (importing it registers every kind)

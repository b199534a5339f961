"""`include:`: a job file composed of other job files.

    include: base/pg19.yaml                        # or a list: [a.yaml, b.yaml]

A path is relative to the including file, so a job runs the same from any working directory
(`bst-dist train jobs/x.yaml`, `ray job submit --working-dir . -- jobs/x.yaml`). The rules:

- A file overrides what it includes: its own keys win.
- Sections (model:, train.optimizer:, ...) merge key by key; every other value is replaced whole,
  mappings such as ray.runtime_env and ray.resources_per_worker included.
- Two included files that set one key differently are an error, unless the including file sets
  that key itself, or one of the two files includes the other. In that last case the including
  one wins, as it does on its own: `tpu_v5p.yaml` includes the family base and overrides its GPU
  placement, so it overrides that placement also where the base arrives through the GPU job.
- Include cycles and missing files are one-line errors naming the files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from bst_dist.config import yaml_file
from bst_dist.config.build import _short, section_fields
from bst_dist.config.schema import ConfigError, JobConfig

Path = tuple[str, ...]


@dataclass(frozen=True)
class _Resolved:
    flat: dict[Path, tuple[Any, str]]  # key path -> (value, real path of the file that set it)
    closure: frozenset[str]  # real paths of every file included, transitively


def _flatten(raw: dict, cls: type | None, prefix: Path, src: str, where: str, out: dict) -> None:
    sections = section_fields(cls) if cls is not None else {}
    for k, v in raw.items():
        path = prefix + (k,)
        if k in sections:
            if v is None:
                continue
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: {'.'.join(map(str, path))}: expected a mapping (section), "
                                  f"got {type(v).__name__}")
            _flatten(v, sections[k], path, src, where, out)
        else:
            out[path] = (v, src)


def _include_list(value: Any, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i.strip() for i in items):
        raise ConfigError(f"{where}: include: expected a path or a list of paths, got {_short(value)}")
    return items


class _Resolver:
    def __init__(self) -> None:
        self.memo: dict[str, _Resolved] = {}
        self.names: dict[str, str] = {}  # real path -> the path as reached (for messages)

    def resolve(self, display: str, stack: tuple[str, ...]) -> _Resolved:
        real = os.path.realpath(display)
        if real in stack:
            chain = [self.names[r] for r in stack[stack.index(real):]] + [display]
            raise ConfigError(f"{self.names[stack[0]]}: include cycle: {' -> '.join(chain)}")
        if real in self.memo:
            return self.memo[real]
        self.names.setdefault(real, display)
        raw = yaml_file.read(display)
        includes = _include_list(raw.pop("include"), display) if "include" in raw else []
        own: dict = {}
        _flatten(raw, JobConfig, (), real, display, own)
        merged: dict[Path, tuple[Any, str]] = {}
        conflicts: dict[Path, tuple] = {}
        closure: set[str] = set()
        for inc in includes:
            child = os.path.normpath(os.path.join(os.path.dirname(display), inc))
            if not os.path.exists(child):
                raise ConfigError(f"{display}: include {inc!r}: no such file {child}")
            sub = self.resolve(child, stack + (real,))
            closure |= {os.path.realpath(child)} | sub.closure
            for path, (value, src) in sub.flat.items():
                if path not in merged:
                    merged[path] = (value, src)
                    continue
                old, old_src = merged[path]
                if old_src == src or src in self.memo[old_src].closure:
                    continue  # the same file, or the one already there includes (overrides) this one
                if old_src in self.memo[src].closure:
                    merged[path] = (value, src)
                elif old != value:
                    conflicts.setdefault(path, (old_src, src, old, value))
        for path, (src_a, src_b, a, b) in conflicts.items():
            if path not in own:
                key = ".".join(map(str, path))
                here = os.path.dirname(display)
                name_a, name_b = (os.path.relpath(self.names[s], here or ".") for s in (src_a, src_b))
                raise ConfigError(f"{display}: its includes {name_a} and {name_b} set {key} differently "
                                  f"({_short(a)} and {_short(b)}); set {key} in {display}")
        merged.update(own)
        self.memo[real] = _Resolved(merged, frozenset(closure))
        return self.memo[real]


def resolve(path: str) -> dict:
    """The job file at `path` with its includes merged, as one nested mapping."""
    flat = _Resolver().resolve(path, ()).flat
    out: dict = {}
    for keys, (value, _) in flat.items():
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out

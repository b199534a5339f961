"""Loading a job: file (with its includes) -> `--set` overrides -> typed sections -> validation.

Overrides use dotted keys: `--set model.d_model=256`; the value is read as YAML.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from bst_dist.config import include, yaml_file
from bst_dist.config.build import build, to_dict
from bst_dist.config.schema import ConfigError, JobConfig
from bst_dist.config.validate import validate


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set model.d_model=256")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item}: empty key; expected e.g. --set model.d_model=256")
    return key.split("."), yaml_file.parse_value(raw)


def _apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = dict(raw)
    for item in overrides or []:
        path, value = _parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return raw


def from_dict(raw: dict, overrides: list[str] | None = None, *, tokenizer: bool = False) -> JobConfig:
    """A resolved spec (plain data, no `include:`) -> a validated JobConfig (`tokenizer`: see validate)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"job spec: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = _apply_overrides(raw, overrides or [])
    return validate(build(JobConfig, raw, ""), tokenizer=tokenizer)


def load(path: str | os.PathLike, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML and its includes, apply `--set` overrides, validate. Raises ConfigError (one line)."""
    path = os.fspath(path)
    raw = include.resolve(path)
    if "name" not in raw:  # a job is named after its file unless it says otherwise
        raw["name"] = os.path.splitext(os.path.basename(path))[0]
    return from_dict(raw, overrides, tokenizer=True)


def dump(cfg: JobConfig) -> str:
    """The resolved spec as YAML: every key, no includes; `load` of it gives `cfg` back."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, width=120)

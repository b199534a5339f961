"""Reading one job file: the checks on the file itself, then safe YAML into plain data.

Refused, each as one line naming the file: a directory or a missing path, a file over MAX_BYTES,
binary data (a NUL byte), text that is not UTF-8, an empty document, more than one document,
a duplicate key (with both line numbers), aliases that expand past MAX_NODES (the
"billion laughs" file), malformed YAML (with its line and column), a top level that is not a
mapping. `1e-4` reads as a float (YAML 1.1 would read it as a string).
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from bst_dist.config.schema import ConfigError

MAX_BYTES = 1 << 20  # a job file is a page of keys; anything this large is the wrong file
MAX_NODES = 100_000  # YAML nodes after expanding aliases; a real job has a few hundred


class Loader(yaml.SafeLoader):
    """Safe YAML that also reads `1e-4` and `1.0e6` as floats (YAML 1.1 wants a dot and a signed
    exponent, so PyYAML reads the notation every user writes as a string)."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_value(text: str) -> Any:
    """One `--set` value as YAML (same number rules as files); text YAML cannot read stays text."""
    try:
        return yaml.load(text, Loader=Loader) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _check_tree(node: yaml.Node, path: str, where: str, budget: list[int]) -> None:
    """Duplicate keys and the expanded size, walking aliases as often as they are used."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"{where}: YAML aliases expand to more than {MAX_NODES} nodes; refused "
                          "(a job file needs no more)")
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            full = f"{path}.{name}" if path and name is not None else (name or path)
            if name is not None and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if name in seen:
                    raise ConfigError(f"{where}: duplicate key {full} at lines {seen[name]} and {line}; "
                                      "a key may appear once per mapping")
                seen[name] = line
            _check_tree(value, full, where, budget)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_tree(item, f"{path}[{i}]", where, budget)


def _text(path: str) -> str:
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory; expected a job YAML file")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such job file")
    size = os.path.getsize(path)
    if size > MAX_BYTES:
        raise ConfigError(f"{path}: {size} bytes; a job file is at most {MAX_BYTES} bytes")
    with open(path, "rb") as f:
        data = f.read()
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigError(f"{path}: binary data (a NUL byte at offset {nul}); expected YAML text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read(path: str) -> dict:
    """The file's top-level mapping, after every check above."""
    text = _text(path)
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{path}: empty job file; expected a mapping of sections (model:, train:, ...)")
        _check_tree(node, "", path, [MAX_NODES])
        raw = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "malformed YAML"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    finally:
        loader.dispose()
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw

"""Job specs: one YAML file (and the files it includes) -> frozen dataclasses, validated once at load.

Every error is a `ConfigError` whose message is one line naming the key and what is allowed;
the CLI prints it without a traceback (exit status 2). The modules:

    schema.py     the sections (dataclasses) and ConfigError: where a new key goes
    yaml_file.py  reading one file safely (size, encoding, duplicate keys, alias expansion)
    include.py    `include:`, merging files into one spec
    build.py      typed construction from plain data, and back (to_dict)
    validate.py   the rules on values and between keys
    load.py       load / from_dict / --set overrides / dump
"""

from bst_dist.config.build import to_dict
from bst_dist.config.load import dump, from_dict, load
from bst_dist.config.schema import (
    BRecTConfig,
    BSTConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    JobConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    RayConfig,
    TrainConfig,
    WandbConfig,
)
from bst_dist.config.validate import validate

__all__ = [
    "BRecTConfig", "BSTConfig", "CheckpointConfig", "ConfigError", "DataConfig", "JobConfig", "MeshConfig",
    "ModelConfig", "OptimizerConfig", "RayConfig", "TrainConfig", "WandbConfig", "dump", "from_dict",
    "load", "to_dict", "validate",
]

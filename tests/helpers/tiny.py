"""The one tiny model of the test suite and the jobs built around it.

Every test that builds a model or trains one starts from TINY_MODEL / TINY_JOB and states only
what it changes: `tiny_model`, `job_dict` and `tiny_sets` merge their overrides key by key, nested
sections included (a dict merges into a dict, anything else replaces the value).

TINY_MODEL has every layer kind in one stack ([block, bst, brect]) and the GPT-2 vocabulary, so it
trains on the stdlib corpus; tests that feed random tokens add RANDOM_TOKENS.
"""

from __future__ import annotations

import copy
import json

import yaml

TINY_MODEL = {"vocab_size": 50257, "d_model": 32, "num_layers": 3, "num_heads": 2, "head_dim": 16, "mlp_dim": 64,
              "block_len": 16, "seq_len": 64, "dtype": "float32", "bst_layers": [1], "brect_layers": [2],
              "bst": {"variant": "SH", "kernel": "s4d", "state_size": 8}, "brect": {"num_states": 4}}

TINY_JOB = {
    "name": "tiny",
    "model": TINY_MODEL,
    "data": {"corpus": "stdlib"},
    "train": {"steps": 8, "global_batch_size": 8, "seed": 0, "log_every": 1,
              "optimizer": {"name": "adamw", "lr": 3.0e-3, "warmup_steps": 2}},
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    "checkpoint": {"every": 2, "keep_last": 3},
}

# For tests that feed random tokens rather than a corpus (the model-level tests, the train step):
# a 64-token vocabulary and L = 32, W = 8, where the GPT-2 vocabulary would only cost time.
RANDOM_TOKENS = {"vocab_size": 64, "block_len": 8, "seq_len": 32}


def merged(base: dict, *layers: dict) -> dict:
    """A deep copy of `base` with each layer merged into it in turn, key by key at every depth."""
    out = copy.deepcopy(base)
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def tiny_model(*layers: dict, **overrides):
    """The validated ModelConfig of TINY_MODEL with `layers` then `overrides` merged in."""
    from bst_dist import config

    return config.from_dict({"model": merged(TINY_MODEL, *layers, overrides)}).model


def job_dict(*layers: dict, **sections) -> dict:
    """TINY_JOB with `layers` then `sections` merged in (e.g. train={"steps": 4}); a copy."""
    return merged(TINY_JOB, *layers, sections)


def write_job(path, *layers: dict, **sections) -> str:
    """job_dict(...) written as a YAML job file at `path`."""
    with open(path, "w") as f:
        yaml.safe_dump(job_dict(*layers, **sections), f)
    return str(path)


def tiny_sets(*layers: dict, **overrides) -> list[str]:
    """`--set` overrides ("model.d_model=32", ...) that make a job file's model the tiny model with
    `layers` then `overrides` merged in: for the CLI runs on jobs/local_tiny.yaml."""
    def flat(prefix: str, d: dict):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flat(f"{prefix}{key}.", value)
            else:
                yield f"{prefix}{key}={value if isinstance(value, str) else json.dumps(value)}"

    return list(flat("model.", merged(TINY_MODEL, *layers, overrides)))


# The reference run of the reshard, failure and export tests (conftest.py: tiny_reference): 6
# steps, checkpoints at 2, 4 and 6.
REFERENCE_JOB = job_dict(train={"steps": 6}, checkpoint={"every": 2, "keep_last": 3})

"""Benchmark cases as job-configuration overrides: every variant is a configuration the library
reads (model.attention_impl, model.bst.ssm_impl, ...), never a patch of module globals."""

from __future__ import annotations

# the paper family's width: d=1024, 8 heads x 128, F=4096, W=512, bf16
WIDTH = dict(vocab_size=50257, d_model=1024, num_heads=8, head_dim=128, mlp_dim=4096, block_len=512,
             dtype="bfloat16", attention_impl="cudnn", dropout=0.0, attn_dropout=0.0)
TINY = dict(vocab_size=256, d_model=64, num_heads=2, head_dim=32, mlp_dim=128, block_len=16,
            dtype="bfloat16", attention_impl="xla", dropout=0.0, attn_dropout=0.0)

# one layer of each kind: name -> model overrides on a 1-layer model
LAYERS = {
    "Slide": {},
    "BST:SH:S4": {"bst_layers": [0], "bst": {"variant": "SH", "kernel": "s4d"}},
    "BST:SH:unstruct": {"bst_layers": [0], "bst": {"variant": "SH", "kernel": "unstruct"}},
    "BST:MH:S4": {"bst_layers": [0], "bst": {"variant": "MH", "kernel": "s4d"}},
    "BST:MF:S4": {"bst_layers": [0], "bst": {"variant": "MF", "kernel": "s4d"}},
    "BST:MF:unstruct": {"bst_layers": [0], "bst": {"variant": "MF", "kernel": "unstruct"}},
    "BRecT:fixed:skip": {"brect_layers": [0], "brect": {"gate": "fixed", "skip": True}},
}
# (batch, length) shapes of the layer benchmark
SHAPES = {"B4xL4096": (4, 4096), "B1xL65536": (1, 65536)}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def layer_model(name: str, seq_len: int, ssm_impl: str, tiny: bool = False) -> dict:
    """The `model:` section of a one-layer model of kind `name`."""
    m = merge(TINY if tiny else WIDTH, LAYERS[name])
    m.update(num_layers=1, seq_len=seq_len)
    m.setdefault("bst_layers", [])
    m.setdefault("brect_layers", [])
    if "bst" in m:
        m["bst"] = merge(m["bst"], {"ssm_impl": ssm_impl})
    return m


def step_job(ssm_impl: str, batch: int, tiny: bool = False) -> dict:
    """The 400M job's model (jobs/pg19_400m.yaml: 24 layers, BST SH S4 at [0, 5, 7, 9]), dropout 0."""
    m = merge(TINY if tiny else WIDTH, {"num_layers": 4 if tiny else 24, "seq_len": 64 if tiny else 4096,
                                        "bst_layers": [0, 2] if tiny else [0, 5, 7, 9], "brect_layers": [],
                                        "bst": {"variant": "SH", "kernel": "s4d", "state_size": 16,
                                                "ssm_impl": ssm_impl}})
    return {"model": m, "train": {"global_batch_size": batch, "steps": 1000, "remat": "none",
                                  "optimizer": {"name": "adafactor", "lr": 0.01, "min_lr_ratio": 0.1,
                                                "warmup_steps": 1000, "schedule": "cosine"}}}

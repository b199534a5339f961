"""A tiny real job (stdlib corpus, every layer kind) for the training tests."""

import os
import subprocess
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_JOB = {
    "name": "tiny",
    "model": {"vocab_size": 50257, "d_model": 32, "num_layers": 3, "num_heads": 2, "head_dim": 16, "mlp_dim": 64,
              "block_len": 16, "seq_len": 64, "dtype": "float32", "bst_layers": [1], "brect_layers": [2],
              "bst": {"variant": "SH", "kernel": "s4d", "state_size": 8}, "brect": {"num_states": 4}},
    "data": {"corpus": "stdlib"},
    "train": {"steps": 8, "global_batch_size": 8, "seed": 0, "log_every": 1,
              "optimizer": {"name": "adamw", "lr": 3.0e-3, "warmup_steps": 2}},
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    "checkpoint": {"every": 2, "keep_last": 3},
}


def write_job(path, **sections) -> str:
    job = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_JOB.items()}
    for section, values in sections.items():
        job[section] = {**job.get(section, {}), **values}
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    return str(path)


def train_subprocess(job: str, run_dir: str, *extra: str, devices: int = 8) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "bst_dist.train", job, "--set", f"train.run_dir={run_dir}", *extra]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metrics_lines(run_dir: str) -> list[str]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f.read().splitlines() if line.strip()]

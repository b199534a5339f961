"""The rules on a typed job spec: ranges of single keys and what keys imply for each other.

One pass at load, before anything compiles or writes; each rule raises a one-line ConfigError
naming the key it refuses. Rules are grouped by section; a new key's rule goes in its section's
function (a new mesh axis in `_mesh`, a new corpus in `_data`).
"""

from __future__ import annotations

from bst_dist.config.schema import ConfigError, JobConfig


def _check_positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


def validate(cfg: JobConfig) -> JobConfig:
    m = cfg.model
    for k in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "mlp_dim", "block_len", "seq_len"):
        _check_positive(f"model.{k}", getattr(m, k))
    if m.seq_len % m.block_len:
        raise ConfigError(f"model.seq_len: L={m.seq_len} must be a multiple of model.block_len W={m.block_len}")
    for name in ("bst_layers", "brect_layers"):
        idx = getattr(m, name)
        for i in idx:
            if not 0 <= i < m.num_layers:
                raise ConfigError(f"model.{name}: layer index {i} out of range; allowed 0..{m.num_layers - 1} (0-based)")
        if len(set(idx)) != len(idx):
            raise ConfigError(f"model.{name}: duplicate layer index in {list(idx)}")
    both = set(m.bst_layers) & set(m.brect_layers)
    if both:
        raise ConfigError(f"model.bst_layers: layer {sorted(both)[0]} is also in model.brect_layers; a layer has one kind")
    if m.bst.state_size % 2:
        raise ConfigError(f"model.bst.state_size: must be even (N/2 complex modes), got {m.bst.state_size}")
    _check_positive("model.bst.num_context_states", m.bst.num_context_states)
    _check_positive("model.bst.ssm_chunk", m.bst.ssm_chunk)
    if m.block_len % min(m.bst.ssm_chunk, m.block_len):
        raise ConfigError(f"model.bst.ssm_chunk: {m.bst.ssm_chunk} must divide model.block_len W={m.block_len}")
    _check_positive("model.brect.num_states", m.brect.num_states)
    if m.num_heads * m.head_dim != m.d_model:
        raise ConfigError(
            f"model.head_dim: num_heads x head_dim = {m.num_heads}x{m.head_dim} = {m.num_heads * m.head_dim} "
            f"must equal model.d_model={m.d_model}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if not 0.0 <= m.attn_dropout < 1.0:
        raise ConfigError(f"model.attn_dropout: must be in [0, 1), got {m.attn_dropout}")
    if m.attention_impl == "cudnn" and (m.mask != "inclusive" or m.attn_dropout > 0 or m.dtype != "bfloat16"):
        raise ConfigError("model.attention_impl: 'cudnn' needs model.mask=inclusive, model.attn_dropout=0 and "
                          f"model.dtype=bfloat16 (got mask={m.mask}, attn_dropout={m.attn_dropout}, dtype={m.dtype})")
    if m.vocab_multiple <= 0 or m.padded_vocab < m.vocab_size:
        raise ConfigError(f"model.vocab_multiple: must be > 0, got {m.vocab_multiple}")

    t = cfg.train
    _check_positive("train.steps", t.steps)
    _check_positive("train.global_batch_size", t.global_batch_size)
    _check_positive("train.grad_accum", t.grad_accum)
    if t.global_batch_size % t.grad_accum:
        raise ConfigError(
            f"train.grad_accum: {t.grad_accum} must divide train.global_batch_size={t.global_batch_size}")
    o = t.optimizer
    _check_positive("train.optimizer.lr", o.lr)
    if o.warmup_steps < 0:
        raise ConfigError(f"train.optimizer.warmup_steps: must be >= 0, got {o.warmup_steps}")

    mesh = cfg.mesh
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError("mesh: at most one axis may be -1 (take the remaining devices)")
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{k}: must be a positive size or -1, got {v}")
    if mesh.tensor > 0 and (m.num_heads % mesh.tensor):
        raise ConfigError(f"mesh.tensor: {mesh.tensor} must divide model.num_heads={m.num_heads}")

    c = cfg.checkpoint
    _check_positive("checkpoint.every", c.every)
    _check_positive("checkpoint.keep_last", c.keep_last)
    _ray(cfg)
    return cfg


def _ray(cfg: JobConfig) -> None:
    r = cfg.ray
    _check_positive("ray.num_workers", r.num_workers)
    if r.use_gpu and r.use_tpu:
        raise ConfigError("ray.use_gpu: use_gpu and use_tpu are exclusive; pick one")
    for name in ("resources_per_worker", "entrypoint_resources"):
        for k, v in getattr(r, name).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"ray.{name}.{k}: expected a number >= 0, got {v!r}")
    if "TPU" in r.resources_per_worker and not r.use_tpu:
        raise ConfigError("ray.resources_per_worker.TPU: set ray.use_tpu: true to reserve TPUs")
    if "GPU" in r.resources_per_worker and not r.use_gpu and r.resources_per_worker["GPU"]:
        raise ConfigError("ray.resources_per_worker.GPU: set ray.use_gpu: true to reserve GPUs")
    if r.use_tpu and r.num_workers > 1 and not (r.topology and r.accelerator_type):
        raise ConfigError("ray.topology: TPU jobs with num_workers > 1 need ray.topology (e.g. 4x4x4) "
                          "and ray.accelerator_type (e.g. TPU-V5P)")
    if r.max_failures < -1:
        raise ConfigError(f"ray.max_failures: must be >= 0, or -1 for unlimited; got {r.max_failures}")
    if r.cpu_devices_per_worker < 0:
        raise ConfigError(f"ray.cpu_devices_per_worker: must be >= 0, got {r.cpu_devices_per_worker}")
    env_vars = r.runtime_env.get("env_vars", {})
    if not isinstance(env_vars, dict):
        raise ConfigError(f"ray.runtime_env.env_vars: expected a mapping, got {env_vars!r}")
    if r.address and r.address.startswith(("http://", "https://")):
        raise ConfigError(f"ray.address: {r.address!r} is a dashboard (job submission) URL; give the GCS "
                          "address (host:6379 or auto), or use `bst-dist submit --address URL`")

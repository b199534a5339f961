"""The rules on a typed job spec: ranges of single keys and what keys imply for each other.

One pass at load, before anything compiles or writes; each rule raises a one-line ConfigError
that starts with the key it refuses. Types (and finite numbers) are checked earlier, by
build.py; this module checks values. Rules are grouped by section: a new key's rule goes in its
section's function (a new corpus in `_data`, a new mesh axis needs none: every integer field of
MeshConfig is an axis and gets the axis rules).
"""

from __future__ import annotations

import dataclasses
import math

from bst_dist.config.schema import ConfigError, JobConfig, MeshConfig, ModelConfig

# Logical axis names the parameters and activations carry (bst_dist/parallel/rules.py DEFAULT_RULES).
LOGICAL_AXES = ("batch", "vocab", "embed", "heads", "mlp", "kv", "norm")
# No single device (accelerator HBM, or a host's memory for a CPU device) holds more than this.
MAX_DEVICE_GIB = 512


def mesh_axes() -> tuple[str, ...]:
    """The mesh axes: the integer fields of MeshConfig, in order."""
    return tuple(f.name for f in dataclasses.fields(MeshConfig) if f.type in (int, "int"))


def _positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


def _at_least_0(key: str, value: int | float) -> None:
    if value < 0:
        raise ConfigError(f"{key}: must be >= 0, got {value}")


def _fraction(key: str, value: float, *, one: bool) -> None:
    """A probability or share: [0, 1] with `one`, else [0, 1)."""
    if not (0.0 <= value <= 1.0 if one else 0.0 <= value < 1.0):
        raise ConfigError(f"{key}: must be in [0, 1{']' if one else ')'}, got {value}")


def _model(m: ModelConfig) -> None:
    for k in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "mlp_dim", "block_len", "seq_len",
              "rel_buckets", "rel_max_distance", "vocab_multiple"):
        _positive(f"model.{k}", getattr(m, k))
    if m.seq_len % m.block_len:
        raise ConfigError(f"model.seq_len: L={m.seq_len} must be a multiple of model.block_len W={m.block_len}")
    if m.num_heads * m.head_dim != m.d_model:
        raise ConfigError(
            f"model.head_dim: num_heads x head_dim = {m.num_heads}x{m.head_dim} = {m.num_heads * m.head_dim} "
            f"must equal model.d_model={m.d_model}")
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
    _fraction("model.dropout", m.dropout, one=False)
    _fraction("model.attn_dropout", m.attn_dropout, one=False)
    if m.attention_impl == "cudnn" and (m.mask != "inclusive" or m.attn_dropout > 0 or m.dtype != "bfloat16"):
        raise ConfigError("model.attention_impl: 'cudnn' needs model.mask=inclusive, model.attn_dropout=0 and "
                          f"model.dtype=bfloat16 (got mask={m.mask}, attn_dropout={m.attn_dropout}, dtype={m.dtype})")
    from bst_dist.models.registry import check as check_layer_kinds  # each kind checks its own section

    check_layer_kinds(m)


def _approx_params(m: ModelConfig) -> int:
    """A lower bound on the parameter count: embedding plus attention and MLP weights."""
    inner = m.num_heads * m.head_dim
    return m.padded_vocab * m.d_model + m.num_layers * (4 * m.d_model * inner + 2 * m.d_model * m.mlp_dim)


def _memory(cfg: JobConfig) -> None:
    """Parameters and their gradients alone (float32: 8 bytes a parameter), over the axes that
    shard them, must fit one device; checked where the mesh sizes are written out."""
    shards = [cfg.mesh.fsdp, cfg.mesh.tensor]
    if any(s <= 0 for s in shards):
        return
    gib = _approx_params(cfg.model) * 8 / math.prod(shards) / 2**30
    if gib > MAX_DEVICE_GIB:
        raise ConfigError(f"model: at least {gib:,.0f} GiB per device for parameters and gradients (mesh.fsdp="
                          f"{cfg.mesh.fsdp} x mesh.tensor={cfg.mesh.tensor}); no device holds over {MAX_DEVICE_GIB} GiB")


def _data(cfg: JobConfig, *, tokenizer: bool) -> None:
    d = cfg.data
    _fraction("data.val_fraction", d.val_fraction, one=False)
    _positive("data.num_shards", d.num_shards)
    _at_least_0("data.prefetch_workers", d.prefetch_workers)
    _positive("data.prefetch_buffer", d.prefetch_buffer)
    if not d.text_field.strip():
        raise ConfigError("data.text_field: must name the JSON field that holds each document's text")
    for k in ("src", "path", "cache_dir"):
        if getattr(d, k) is not None and not getattr(d, k).strip():
            raise ConfigError(f"data.{k}: empty; leave it out (null) for the default")
    if tokenizer:
        # Every corpus is tokenized with GPT-2 BPE (data_pipelines/tokenizer.py): its ids must index
        # the embedding. Checked for job files, which train on their corpus; a spec built in code
        # (tests, exports) may carry a model alone.
        from data_pipelines.tokenizer import N_VOCAB
        from data_pipelines.tokenizer import NAME as TOKENIZER

        if cfg.model.vocab_size < N_VOCAB:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is below the {N_VOCAB} ids of the "
                              f"{TOKENIZER} tokenizer that data.corpus={d.corpus} is read with")


def _train(cfg: JobConfig) -> None:
    t = cfg.train
    _positive("train.steps", t.steps)
    _positive("train.global_batch_size", t.global_batch_size)
    _positive("train.grad_accum", t.grad_accum)
    if t.global_batch_size % t.grad_accum:
        raise ConfigError(f"train.grad_accum: {t.grad_accum} must divide train.global_batch_size={t.global_batch_size}")
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"train.seed: must be in [0, 2**32), got {t.seed}")
    if not t.run_dir.strip():
        raise ConfigError("train.run_dir: empty; give the folder the run writes to")
    _positive("train.log_every", t.log_every)
    _at_least_0("train.eval_every", t.eval_every)
    _positive("train.eval_batches", t.eval_batches)
    _at_least_0("train.max_nan_steps", t.max_nan_steps)
    if len(set(t.loggers)) != len(t.loggers):
        raise ConfigError(f"train.loggers: {list(t.loggers)} names a logger twice")
    if "jsonl" not in t.loggers:
        raise ConfigError(f"train.loggers: {list(t.loggers)} must include jsonl (metrics.jsonl is what resumes, "
                          "plots and `bst-dist inspect` read)")
    for i, tag in enumerate(t.wandb.tags):
        if not tag.strip() or len(tag) > 64:
            raise ConfigError(f"train.wandb.tags[{i}]: {tag!r}; a tag is 1 to 64 characters")
    for k in ("project", "entity", "name"):
        if getattr(t.wandb, k) is not None and not getattr(t.wandb, k).strip():
            raise ConfigError(f"train.wandb.{k}: empty; leave it out (null) for the default")
    if t.profile_steps is not None:
        start, stop = t.profile_steps
        if not 0 <= start < stop:
            raise ConfigError(f"train.profile_steps: [{start}, {stop}]; need stop > start >= 0 (the trace holds "
                              "steps start+1..stop)")
        if stop > t.steps:
            raise ConfigError(f"train.profile_steps: stop {stop} is past train.steps={t.steps}")
    cc = t.compile_cache
    if cc is not None and cc != "" and not cc.strip():
        raise ConfigError('train.compile_cache: blank; give a folder, "" to turn the cache off, or leave it out')
    if cc and "://" in cc and not cc.startswith("gs://"):
        raise ConfigError(f"train.compile_cache: {cc!r}: a local folder or gs://bucket/prefix")
    o = t.optimizer
    _positive("train.optimizer.lr", o.lr)
    _fraction("train.optimizer.min_lr_ratio", o.min_lr_ratio, one=True)
    _at_least_0("train.optimizer.warmup_steps", o.warmup_steps)
    _fraction("train.optimizer.b1", o.b1, one=False)
    _fraction("train.optimizer.b2", o.b2, one=False)
    _positive("train.optimizer.eps", o.eps)
    _at_least_0("train.optimizer.weight_decay", o.weight_decay)
    _at_least_0("train.optimizer.clip_norm", o.clip_norm)  # 0 disables clipping


def _mesh(cfg: JobConfig) -> None:
    mesh = cfg.mesh
    axes = mesh_axes()
    sizes = {a: getattr(mesh, a) for a in axes}
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{k}: must be a positive size or -1 (the remaining devices), got {v}")
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError(f"mesh.{[k for k, v in sizes.items() if v == -1][1]}: at most one axis may be -1 "
                          "(take the remaining devices)")
    if mesh.tensor > 0 and (cfg.model.num_heads % mesh.tensor):
        raise ConfigError(f"mesh.tensor: {mesh.tensor} must divide model.num_heads={cfg.model.num_heads}")
    slices = dcn_slices(mesh.dcn)
    if mesh.data > 0 and mesh.data % slices:
        raise ConfigError(f"mesh.dcn.data: {slices} slices do not divide mesh.data = {mesh.data}")
    for i, (name, target) in enumerate(mesh.rules):
        if name not in LOGICAL_AXES:
            raise ConfigError(f"mesh.rules[{i}]: unknown logical axis {name!r}; allowed: {', '.join(LOGICAL_AXES)}")
        if target is not None and target not in axes:
            raise ConfigError(f"mesh.rules[{i}]: {name} -> {target!r}; allowed mesh axes: {', '.join(axes)} or null")


def dcn_slices(dcn: dict) -> int:
    """The slice count `mesh.dcn` asks for (1 without it); only `data` may span slices: FSDP
    all-gathers and tensor-parallel reductions run every layer and need ICI bandwidth, data
    parallelism reduces gradients once per step."""
    for k, v in dcn.items():
        if k in ("fsdp", "tensor"):
            raise ConfigError(f"mesh.dcn.{k}: only data may span slices ({k} collectives run every layer and "
                              "need ICI); use mesh.dcn: {data: N}")
        if k != "data":
            raise ConfigError(f"mesh.dcn.{k}: unknown mesh axis; allowed: data")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"mesh.dcn.{k}: expected a positive number of slices, got {v!r}")
    return dcn.get("data", 1)


def _checkpoint(cfg: JobConfig) -> None:
    c = cfg.checkpoint
    _positive("checkpoint.every", c.every)
    _positive("checkpoint.keep_last", c.keep_last)
    _at_least_0("checkpoint.keep_every", c.keep_every)
    if c.keep_every and c.keep_every % c.every:
        raise ConfigError(f"checkpoint.keep_every: {c.keep_every} must be a multiple of checkpoint.every={c.every} "
                          "(only saved steps can be kept)")
    if c.dir is not None and not c.dir.strip():
        raise ConfigError("checkpoint.dir: empty; leave it out (null) for <train.run_dir>/checkpoints")


def _ray(cfg: JobConfig) -> None:
    r = cfg.ray
    _positive("ray.num_workers", r.num_workers)
    if r.use_gpu and r.use_tpu:
        raise ConfigError("ray.use_gpu: use_gpu and use_tpu are exclusive; pick one")
    if r.use_tpu and r.topology:  # one Ray worker per TPU host, in every slice
        from bst_dist.parallel.topology import check_num_workers

        slices = dcn_slices(cfg.mesh.dcn)
        problem = check_num_workers(r.num_workers, r.topology, r.accelerator_type, slices)
        if problem:
            raise ConfigError(problem)
    for name in ("resources_per_worker", "entrypoint_resources"):
        for k, v in getattr(r, name).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
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
    _at_least_0("ray.cpu_devices_per_worker", r.cpu_devices_per_worker)
    env_vars = r.runtime_env.get("env_vars", {})
    if not isinstance(env_vars, dict):
        raise ConfigError(f"ray.runtime_env.env_vars: expected a mapping, got {env_vars!r}")
    for k, v in env_vars.items():
        if not isinstance(v, str):  # Ray refuses them only when the job starts; quote them in YAML
            raise ConfigError(f"ray.runtime_env.env_vars.{k}: expected a string (quote it), got {v!r}")
    if r.address and r.address.startswith(("http://", "https://")):
        raise ConfigError(f"ray.address: {r.address!r} is a dashboard (job submission) URL; give the GCS "
                          "address (host:6379 or auto), or use `bst-dist submit --address URL`")


def validate(cfg: JobConfig, *, tokenizer: bool = False) -> JobConfig:
    """Every rule, section by section; `tokenizer`: also what the corpus's tokenizer implies."""
    if not cfg.name.strip() or "/" in cfg.name or not cfg.name.isprintable():
        raise ConfigError(f"name: {cfg.name!r}; a job name is printable, not empty, without '/' (it names runs)")
    _model(cfg.model)
    _data(cfg, tokenizer=tokenizer)
    _train(cfg)
    _mesh(cfg)
    _memory(cfg)
    _checkpoint(cfg)
    _ray(cfg)
    return cfg

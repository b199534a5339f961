"""Job specs: one YAML file -> frozen dataclasses, validated once at load.

Every error is a `ConfigError` whose message is one line naming the key and what is allowed;
the CLI prints it without a traceback. Overrides use dotted keys: `--set model.d_model=256`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from bst_dist.errors import UserError


class ConfigError(UserError, ValueError):
    """A job spec that cannot run; the message is one line naming the key."""


# --------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class BSTConfig:
    variant: Literal["SH", "MH", "MF"] = "SH"
    kernel: Literal["s4d", "unstruct"] = "s4d"
    state_size: int = 16  # N (the paper's D): N/2 complex modes
    num_context_states: int = 32  # S for MF
    s4d_init: Literal["lin", "inv"] = "lin"
    filter_emb_dim: int = 33  # unstruct: Hyena positional embedding width (J = 16)
    filter_hidden: int = 64  # unstruct: implicit-filter MLP width
    filter_sin_freq: float = 14.0  # unstruct: Hyena's Sin activation frequency
    carry: bool = True  # the cross-sequence SSM carry (docs/models.md)
    # how the S4D convolution is computed (same function either way, float32):
    #   "chunked": chunk by chunk, a Toeplitz matmul inside a chunk and the diagonal state passed
    #   across chunks (linear in L); "fft": one 2L-point FFT convolution with the L-long kernel
    ssm_impl: Literal["chunked", "fft"] = "fft"  # chunked: exact too, the default once GPU timings show it faster
    ssm_chunk: int = 64  # chunked: tokens per chunk (at most model.block_len W, which it must divide)


@dataclass(frozen=True)
class BRecTConfig:
    num_states: int = 512  # S
    gate: Literal["fixed", "lstm"] = "fixed"
    skip: bool = True  # True: skip config (no horizontal FFN); False: dual


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50257
    d_model: int = 1024
    num_layers: int = 12
    num_heads: int = 8
    head_dim: int = 128
    mlp_dim: int = 4096
    block_len: int = 512  # W
    seq_len: int = 4096  # L (training length; the model runs any multiple of W)
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # compute dtype; params are float32
    mask: Literal["inclusive", "strict"] = "inclusive"
    # block self-attention: "xla" (einsums, any mask) or "cudnn" (fused flash kernel, GPU, bf16,
    # inclusive mask, no attention dropout)
    attention_impl: Literal["xla", "cudnn"] = "xla"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    rel_buckets: int = 32
    rel_max_distance: int = 128
    xl_cache: bool = True  # keys/values of the previous sequence's last block
    vocab_multiple: int = 128  # pad the vocabulary to a multiple of this
    bst_layers: tuple[int, ...] = ()
    bst: BSTConfig = field(default_factory=BSTConfig)
    brect_layers: tuple[int, ...] = ()
    brect: BRecTConfig = field(default_factory=BRecTConfig)

    @property
    def W(self) -> int:
        return self.block_len

    @property
    def L(self) -> int:
        return self.seq_len

    @property
    def padded_vocab(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def layer_kind(self, i: int) -> str:
        if i in self.bst_layers:
            return "bst"
        if i in self.brect_layers:
            return "brect"
        return "block"


@dataclass(frozen=True)
class DataConfig:
    # docs/data.md. The stdlib corpus (the running Python's standard library, all of it: ~15M
    # tokens, prepared in 4-6 s on 2 cores) needs no download and no src.
    corpus: Literal["stdlib", "shakespeare", "pg19", "text", "jsonl"] = "stdlib"
    src: Optional[str] = None  # raw corpus location (folder, file, gs://...); None: the corpus default
    path: Optional[str] = None  # prepared shards (bst-dist prepare-data --out); None: <cache_dir>/data/<corpus>
    cache_dir: Optional[str] = None  # None: $BST_DIST_CACHE or ~/.cache/bst_dist
    text_field: str = "text"  # jsonl corpora
    val_fraction: float = 0.05  # non-PG-19 corpora: share of documents (by name hash) in validation
    num_shards: int = 8  # ArrayRecord shards per split (the unit of parallel, resumable preparation)
    prefetch_workers: int = 0  # background worker processes (Grain mp_prefetch); 0 = in-process
    prefetch_buffer: int = 2  # batches buffered per worker


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "adafactor"] = "adamw"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: Literal["cosine", "rsqrt", "constant"] = "cosine"
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-9
    weight_decay: float = 0.05
    clip_norm: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 8
    seed: int = 0
    run_dir: str = "runs/default"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    grad_accum: int = 1
    remat: Literal["none", "full", "dots"] = "none"
    carry_cache: bool = True
    log_every: int = 1
    eval_every: int = 0  # 0: no evaluation during training
    eval_batches: int = 4
    max_nan_steps: int = 5


@dataclass(frozen=True)
class MeshConfig:
    # -1 on one axis: take the remaining devices.
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[tuple[str, Optional[str]], ...] = ()  # extra logical-axis rules, override defaults
    # mesh positions -> devices: default (jax.make_mesh), interleaved, or a permutation (parallel/mesh.py)
    device_order: Union[str, tuple[int, ...]] = "default"
    # axes split across slices (DCN), e.g. {data: 2}: the axis sizes above are totals (parallel/mesh.py)
    dcn: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointConfig:
    dir: Optional[str] = None  # None: <run_dir>/checkpoints
    every: int = 100
    keep_last: int = 3
    keep_every: int = 0  # also keep every Nth step; 0: none
    async_save: bool = True


@dataclass(frozen=True)
class RayConfig:
    """The `ray:` section: how `bst-dist train` runs the job under Ray Train (docs/launch.md)."""

    # GCS address ("host:6379", "auto"); None: $RAY_ADDRESS, else an embedded local Ray on 127.0.0.1
    address: Optional[str] = None
    num_workers: int = 1  # JAX processes: one per GPU host (with all its GPUs) or per TPU host
    resources_per_worker: dict = field(default_factory=dict)  # e.g. {GPU: 8, CPU: 96} or {TPU: 4}
    use_gpu: bool = False
    use_tpu: bool = False
    topology: Optional[str] = None  # TPU slice topology, e.g. "4x4x4" (v5p-128)
    accelerator_type: Optional[str] = None  # e.g. "TPU-V5P", "H100"
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = 0  # worker-group restarts (FailureConfig); -1: unlimited
    storage_path: Optional[str] = None  # Ray Train's run records; None: ~/ray_results
    # The job's runtime_env (bst-dist submit, and drivers connecting to a remote --address):
    # working_dir, excludes, env_vars, pip, ... env_vars also reach every worker.
    runtime_env: dict = field(default_factory=dict)
    entrypoint_resources: dict = field(default_factory=dict)  # bst-dist submit: {CPU: 1, memory: 2e9, ...}
    cpu_devices_per_worker: int = 0  # CPU runs: fake XLA devices per worker (0: leave as is)

    def __post_init__(self) -> None:
        for name in ("resources_per_worker", "entrypoint_resources"):
            for k, v in getattr(self, name).items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise ConfigError(f"ray.{name}.{k}: expected a number >= 0, got {v!r}")
        if "TPU" in self.resources_per_worker and not self.use_tpu:
            raise ConfigError("ray.resources_per_worker.TPU: set ray.use_tpu: true to reserve TPUs")
        if "GPU" in self.resources_per_worker and not self.use_gpu and self.resources_per_worker["GPU"]:
            raise ConfigError("ray.resources_per_worker.GPU: set ray.use_gpu: true to reserve GPUs")
        if self.use_tpu and self.num_workers > 1 and not (self.topology and self.accelerator_type):
            raise ConfigError("ray.topology: TPU jobs with num_workers > 1 need ray.topology (e.g. 4x4x4) "
                              "and ray.accelerator_type (e.g. TPU-V5P)")
        if self.max_failures < -1:
            raise ConfigError(f"ray.max_failures: must be >= 0, or -1 for unlimited; got {self.max_failures}")
        if self.cpu_devices_per_worker < 0:
            raise ConfigError(f"ray.cpu_devices_per_worker: must be >= 0, got {self.cpu_devices_per_worker}")
        env_vars = self.runtime_env.get("env_vars", {})
        if not isinstance(env_vars, dict):
            raise ConfigError(f"ray.runtime_env.env_vars: expected a mapping, got {env_vars!r}")
        if self.address and self.address.startswith(("http://", "https://")):
            raise ConfigError(f"ray.address: {self.address!r} is a dashboard (job submission) URL; give the GCS "
                              "address (host:6379 or auto), or use `bst-dist submit --address URL`")


@dataclass(frozen=True)
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    name: str = "job"
    description: str = ""


# --------------------------------------------------------------------------------------------
# Generic typed construction


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected a list of {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(names)}"
            raise ConfigError(f"{key}: unknown key{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Cross-field validation


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
    _check_positive("ray.num_workers", cfg.ray.num_workers)
    if cfg.ray.use_gpu and cfg.ray.use_tpu:
        raise ConfigError("ray.use_gpu: use_gpu and use_tpu are exclusive; pick one")
    if cfg.ray.use_tpu and cfg.ray.topology:
        from bst_dist.parallel.topology import check_num_workers

        slices = math.prod(int(v) for v in cfg.mesh.dcn.values() if isinstance(v, int)) or 1
        problem = check_num_workers(cfg.ray.num_workers, cfg.ray.topology, cfg.ray.accelerator_type, slices)
        if problem:
            raise ConfigError(problem)
    return cfg


# --------------------------------------------------------------------------------------------
# Loading and overrides


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set model.d_model=256")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
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


def from_dict(raw: dict, overrides: list[str] | None = None) -> JobConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"job spec: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    return validate(_build(JobConfig, raw, ""))


def load(path: str | os.PathLike, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML, apply `--set` overrides, validate. Raises ConfigError (one line)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such job file")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "malformed YAML"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    cfg = from_dict(raw, overrides)
    if cfg.name == "job":
        cfg = dataclasses.replace(cfg, name=os.path.splitext(os.path.basename(path))[0])
    return cfg


def to_dict(cfg: Any) -> Any:
    """The resolved spec as plain data (for run dirs, checkpoints, `describe --json`)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump(cfg: JobConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: Any, **changes) -> Any:
    return dataclasses.replace(cfg, **changes)

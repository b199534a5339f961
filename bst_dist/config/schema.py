"""The sections of a job spec as frozen dataclasses, and the error a bad spec raises.

A new key is one field here (with its default and a comment saying what it is for) plus, where
it has a range or depends on another key, one rule in bst_dist/config/validate.py. A new section
is a dataclass here and a field of JobConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from bst_dist.errors import UserError

MAX_MESSAGE = 400  # characters: a refusal is one line a terminal shows whole


class ConfigError(UserError, ValueError):
    """A job spec that cannot run; the message is one bounded line naming the key."""

    def __init__(self, message: str):
        line = " ".join(str(message).split())
        if len(line) > MAX_MESSAGE:
            line = line[: MAX_MESSAGE - 3] + "..."
        super().__init__(line)


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
    corpus: Literal["stdlib", "shakespeare", "pg19", "text", "jsonl", "pysrc"] = "stdlib"
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
class WandbConfig:
    """`train.wandb`: the Weights & Biases run, used with `wandb` in train.loggers (docs/training.md)."""

    project: Optional[str] = None  # None: $WANDB_PROJECT, else the job's name
    entity: Optional[str] = None  # None: $WANDB_ENTITY, else the account's default
    mode: Optional[Literal["online", "offline", "disabled"]] = None  # None: $WANDB_MODE, else online
    tags: tuple[str, ...] = ()
    name: Optional[str] = None  # the run's display name; None: the run directory's name


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
    # start from these parameters (a run directory, a checkpoint step directory or a `bst-dist
    # export`) with a fresh optimizer; ignored once the run has a checkpoint of its own
    init_from: Optional[str] = None
    # where the chief's per-step metrics go: metrics.jsonl (always: resumes, plots and inspect
    # read it), TensorBoard events under <run_dir>/tb, a Weights & Biases run (train.wandb)
    loggers: tuple[Literal["jsonl", "tensorboard", "wandb"], ...] = ("jsonl", "tensorboard")
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # [start, stop]: a JAX profiler trace of steps start+1..stop (process 0) under <run_dir>/tb,
    # for TensorBoard's profile plugin; start 0 includes the first step's compilation
    profile_steps: Optional[tuple[int, int]] = None
    # JAX's persistent compilation cache (train/compile_cache.py): a folder (local or gs://);
    # None: $BST_DIST_CACHE/jax, else ~/.cache/bst_dist/jax; "": off
    compile_cache: Optional[str] = None


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

"""Helpers for the training tests: a tiny real job (stdlib corpus, every layer kind) run as a
subprocess or in this process, reading checkpoints back, counting compilations, and the synthetic
long-range recall corpus of test_cache_matters.py."""

import copy
import json
import os
import shutil
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
    cmd = [sys.executable, "-m", "bst_dist", "train", "--no-ray", job, "--set", f"train.run_dir={run_dir}", *extra]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metrics_lines(run_dir: str) -> list[str]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f.read().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# In-process jobs (the caller's process already has the 8 fake devices of conftest.py)


def job_dict(**sections) -> dict:
    """TINY_JOB with sections merged one level deep (e.g. train={"steps": 4}); a copy."""
    job = copy.deepcopy(TINY_JOB)
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(job.get(section), dict):
            job[section] = {**job[section], **copy.deepcopy(values)}
        else:
            job[section] = copy.deepcopy(values)
    return job


# The reference run of the reshard and failure tests (conftest.py: tiny_reference): 6 steps,
# checkpoints at 2, 4 and 6.
REFERENCE_JOB = job_dict(train={"steps": 6}, checkpoint={"every": 2, "keep_last": 3})


def make_cfg(job: dict, run_dir, overrides: list[str] | None = None):
    """The validated JobConfig of `job` with train.run_dir set (and `--set`-style overrides)."""
    from bst_dist import config

    return config.from_dict(job, [f"train.run_dir={run_dir}", *(overrides or [])])


def train_in_process(job: dict, run_dir, overrides: list[str] | None = None) -> dict:
    """bst_dist.train.loop.train on the job; returns its summary."""
    from bst_dist.train.loop import train

    return train(make_cfg(job, run_dir, overrides))


def copy_checkpoint(src_run_dir, dst_run_dir, step: int) -> None:
    """A new run dir holding only checkpoint `step` of another run (as if that run stopped there)."""
    src = os.path.join(src_run_dir, "checkpoints", str(step))
    assert os.path.isdir(src), f"no checkpoint step {step} in {src_run_dir}: {os.listdir(os.path.dirname(src))}"
    shutil.copytree(src, os.path.join(dst_run_dir, "checkpoints", str(step)))


def checkpoint_steps(run_dir) -> list[int]:
    d = os.path.join(run_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def losses_of(run_dir) -> list[float]:
    """The per-step losses of metrics.jsonl, in step order."""
    return [json.loads(line)["loss"] for line in metrics_lines(run_dir)]


class CompileCounter:
    """Counts XLA backend compilations while active (jax.monitoring), to assert that a bad job
    is refused before anything is compiled."""

    def __init__(self):
        self.count = 0

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        import jax
        import numpy as np

        jax.monitoring.register_event_duration_secs_listener(self._listener)
        # The instrument proves itself each time: a fresh function must register a compilation,
        # else every "nothing was compiled" assertion would pass vacuously.
        salt = float(np.random.default_rng().integers(1 << 30))
        jax.jit(lambda x: x * salt + 1)(np.arange(3.0))
        assert self.count >= 1, "CompileCounter saw no compilation of a fresh function: the listener is dead"
        self.count = 0
        return self

    def __exit__(self, *exc):
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listener)


# --------------------------------------------------------------------------------------------
# The long-range recall task (tests/test_cache_matters.py)
#
# Every word below is one GPT-2 token with its leading space, so a document of n words is exactly
# n + 1 tokens (<|endoftext|> first) and token positions are known without tokenizing.

RECALL_KEYS = ("red", "blue", "green", "black", "white", "brown", "pink", "gray")
RECALL_FILLER = ("the", "and", "of", "to", "in", "is", "was", "for")
RECALL_MARKER = "Answer"


def recall_positions(seq_len: int, num_seqs: int, every: int = 2) -> list[int]:
    """Token positions (in the document, <|endoftext|> = 0) of the recalled key: position s*L + 1
    for s = every, 2*every, ... < num_seqs, i.e. the first target of sequence s, right after the
    marker (the sequence's first input)."""
    return [s * seq_len + 1 for s in range(every, num_seqs, every)]


def recall_document(rng, seq_len: int, num_seqs: int, every: int = 2, filler=RECALL_FILLER, stated: int = 1,
                    repeat: int = 1) -> list[str]:
    """The words of one document: tokens 1.. of num_seqs sequences of seq_len targets.

    Tokens 1..stated state the key (one of RECALL_KEYS, uniform); the first input of every
    `every`-th sequence from sequence `every` on is RECALL_MARKER, its target (the recall) is the key
    and so are the `repeat` - 1 tokens after it; every other token is filler drawn uniformly from
    `filler`, independent of the key. With every=2 each recall comes more than a whole sequence
    after the key's previous occurrence.
    """
    n = seq_len * num_seqs  # targets; the document has n + 1 tokens with <|endoftext|>
    key = RECALL_KEYS[rng.integers(len(RECALL_KEYS))]
    words = [filler[i] for i in rng.integers(len(filler), size=n)]
    words[:stated] = [key] * stated
    for p in recall_positions(seq_len, num_seqs, every):
        words[p - 2] = RECALL_MARKER  # token p - 1 (word index = token index - 1)
        words[p - 1:p - 1 + repeat] = [key] * repeat
    return words


def write_recall_corpus(folder, num_docs: int, seq_len: int, num_seqs: int, seed: int, every: int = 2,
                        filler=RECALL_FILLER, stated: int = 1, repeat: int = 1) -> str:
    """num_docs recall documents as .txt files (the `text` corpus layout)."""
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_docs):
        words = recall_document(rng, seq_len, num_seqs, every, filler, stated, repeat)
        with open(os.path.join(folder, f"doc{i:05d}.txt"), "w") as f:
            f.write("".join(" " + w for w in words))
    return str(folder)


def prepare_text_corpus(src, out, val_fraction: float = 0.1) -> str:
    """prepare-data of a `text` folder into `out`, in this process (no worker processes)."""
    from data_pipelines import prepare

    prepare("text", str(src), str(out), num_shards=1, workers=1, val_fraction=val_fraction, progress=False)
    return str(out)


def token_nats(cfg, graphdef, params, docs, *, carry: bool):
    """Per-target nats (n, T - 1) of documents docs (int32 [n, T], T - 1 a multiple of L), read
    as training reads them: L-long sequences in order, the cache carried from one sequence to the
    next (carry=True) or fresh for every sequence (carry=False: train.carry_cache=false)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bst_dist import parallel
    from bst_dist.models import Cache

    L, B = cfg.model.seq_len, cfg.train.global_batch_size
    n, T = docs.shape
    assert (T - 1) % L == 0, (T, L)
    mesh, rules = parallel.make_mesh(cfg.mesh), parallel.rules_from_config(cfg.mesh)
    cache_sh = parallel.cache_shardings(Cache.spec(cfg.model, B), mesh, rules)
    rows2, rows1 = parallel.batch_sharding(mesh, 2, rules), parallel.batch_sharding(mesh, 1, rules)

    @jax.jit
    def step(params, cache, inputs, targets, doc_start):
        model = nnx.merge(graphdef, params)
        nats, cache = model.token_nll(inputs, targets, cache, doc_start)
        return cache, nats

    fresh = lambda: Cache.zeros(cfg.model, B, sharding=cache_sh)  # noqa: E731
    out = np.zeros((n, T - 1), np.float32)
    for lo in range(0, n, B):
        rows = np.zeros((B, T), np.int32)
        rows[:min(B, n - lo)] = docs[lo:lo + B]
        cache = fresh()
        for s in range((T - 1) // L):
            seq = rows[:, s * L:(s + 1) * L + 1]
            start = np.full((B,), s == 0 or not carry)
            put = jax.device_put
            cache, nats = step(params, cache, put(seq[:, :-1], rows2), put(seq[:, 1:], rows2), put(start, rows1))
            out[lo:lo + B, s * L:(s + 1) * L] = np.asarray(nats)[:min(B, n - lo)]
    return out


# --------------------------------------------------------------------------------------------
# Reading checkpoints back


def read_checkpoint(run_dir, step: int) -> dict:
    """Checkpoint `step` of a run as written, without building the model: {"state", "cache" (None
    when not written), "meta", "data" (the loader state)}. Arrays come back with the shardings they
    were saved with (on this process's devices); nnx Variables as {"value": array} dicts."""
    import orbax.checkpoint as ocp

    d = os.path.join(str(run_dir), "checkpoints", str(step))
    with ocp.StandardCheckpointer() as ckpt:
        out = {"state": ckpt.restore(os.path.join(d, "state")),
               "cache": ckpt.restore(os.path.join(d, "cache")) if os.path.isdir(os.path.join(d, "cache")) else None}
    with open(os.path.join(d, "meta", "metadata")) as f:
        out["meta"] = json.load(f)
    with open(os.path.join(d, "data", "process_0-of-1.json")) as f:
        out["data"] = json.load(f)
    return out


def digest(tree) -> str:
    """sha256 of a pytree's array bytes, for bitwise comparisons."""
    from bst_dist.train.loop import tree_digest

    return tree_digest(tree)


def model_params(cfg, saved_params):
    """(graphdef, nnx.State) of cfg's model holding the parameters of a `read_checkpoint` state."""
    import jax
    from flax import nnx

    from bst_dist.models import build

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(cfg.model, nnx.Rngs(0))))
    leaves = jax.tree.leaves(saved_params)
    want = jax.tree.leaves(abstract)
    assert [x.shape for x in leaves] == [x.shape for x in want], "checkpoint and model differ"
    return graphdef, jax.tree.unflatten(jax.tree.structure(abstract), leaves)


# --------------------------------------------------------------------------------------------
# Unwritable and full locations


def tmpfs(path, size: str, *, read_only: bool = False):
    """Mount a tmpfs of `size` on `path` (a context manager); pytest.skip where mounting is not
    allowed (not root, or no mount privilege in this container)."""
    import contextlib

    import pytest

    @contextlib.contextmanager
    def mounted():
        os.makedirs(path, exist_ok=True)
        opts = f"size={size}" + (",ro" if read_only else "")
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if p.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode})")
        try:
            yield str(path)
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)

    return mounted()

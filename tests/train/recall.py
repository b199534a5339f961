"""The synthetic long-range recall corpus of test_cache_matters.py, and per-token losses read
the way training reads documents (cache carried or fresh)."""

import os

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

"""Block-state decoding with the model's public call `logits, cache = model(tokens, cache, doc_start)`.

The model is causal and runs any multiple of W tokens, so the state of a sequence is
  * `cache`: the model's cache as it stood at the start of the current segment, and
  * `buf` (B, S), `n`: the current segment's tokens so far (n of them, 1 <= n <= S after a push).
The logits for the next token are the model applied to `buf` (padded to S: tokens after
position n-1 cannot change earlier outputs) with `cache`, read at position n-1. When the segment
is complete, that same forward also returns the folded cache, exactly as the cross-sequence
carry of training does, and the buffer empties. Memory per sequence is O(S + cache), whatever
the generated length; compute per token is one forward over S tokens.

S (`segment_len`) is W when splitting an L-long sequence into W-long calls with the cache carried
gives the same outputs as one call (Slide / Transformer-XL with the XL cache, BRecT, BST with the
S4D carry), and L otherwise: an unstructured filter has the call's support and carries the
previous call's input, and a layer without its carry sees only the call. The prompt is prefilled
in L-long calls (then the whole segments left over in one call), so its segmentation is the
training stream's: the reference for position t is the forward over L-long sequences carrying
the cache (or resetting it at every L boundary when training did not carry it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bst_dist.generate.sampling import check_sampling, sample


class PromptError(ValueError):
    """An empty or out-of-vocabulary prompt (a one-line message)."""


def segment_len(cfg) -> int:
    """The call length S of decoding (see the module doc)."""
    from bst_dist.models.registry import stack

    exact = cfg.xl_cache and all(kind.exact_in_blocks(cfg) for kind in stack(cfg))
    return cfg.block_len if exact else cfg.seq_len


class Decoder:
    """Pure functions over the decoding state {"cache", "buf", "n", "pos"}; the state's size
    does not depend on how many tokens were generated."""

    def __init__(self, model, batch: int, carry: bool = True):
        self.cfg = model.cfg
        self.B, self.S, self.L = batch, segment_len(model.cfg), model.cfg.seq_len
        self.carry = carry
        self.graphdef, self.params = nnx.split(model)
        self._fresh = model.init_cache(batch)
        self._fwd = jax.jit(self._forward)

    def _forward(self, params, tokens, cache):
        model = nnx.merge(self.graphdef, params)
        return model(tokens, cache, jnp.zeros((tokens.shape[0],), bool))

    def _after_segment(self, cache, pos):
        """The cache entering the segment at absolute position `pos` (a multiple of S)."""
        if self.carry:
            return cache
        reset = (pos % self.L) == 0
        return jax.tree.map(lambda c, f: jnp.where(reset, f, c), cache, self._fresh)

    # -- prefill -------------------------------------------------------------------------------

    def prefill(self, prompt: np.ndarray) -> dict:
        """prompt int (B, P), P >= 1 -> state with the last 1..S prompt tokens in the buffer."""
        B, P = prompt.shape
        S, L = self.S, self.L
        r = (P - 1) % S + 1
        head = P - r
        cache = self._fresh
        start = 0
        while start < head:  # L-aligned calls as in training, then the whole segments left in one
            end = min(head, (start // L + 1) * L)
            _, cache = self._fwd(self.params, jnp.asarray(prompt[:, start:end], jnp.int32), cache)
            if not self.carry and end % L == 0:
                cache = self._fresh
            start = end
        buf = np.zeros((B, S), np.int32)
        buf[:, :r] = prompt[:, head:]
        return {"cache": cache, "buf": jnp.asarray(buf), "n": jnp.int32(r), "pos": jnp.int32(head)}

    # -- one token -----------------------------------------------------------------------------

    def logits(self, params, state: dict) -> tuple[jax.Array, dict]:
        """(B, vocab) float32 logits for the token after the buffer, and the state with the
        segment folded into the cache when the buffer is full."""
        out, new_cache = self._forward(params, state["buf"], state["cache"])
        n = state["n"]
        logits = jax.lax.dynamic_index_in_dim(out, n - 1, axis=1, keepdims=False)[:, :self.cfg.vocab_size]
        full = n == self.S
        pos = state["pos"] + jnp.where(full, self.S, 0)
        cache = jax.tree.map(lambda a, b: jnp.where(full, a, b), self._after_segment(new_cache, pos),
                             state["cache"])
        return logits, {"cache": cache, "buf": jnp.where(full, 0, state["buf"]), "n": jnp.where(full, 0, n),
                        "pos": pos}

    @staticmethod
    def push(state: dict, tok: jax.Array) -> dict:
        buf = jax.lax.dynamic_update_slice_in_dim(state["buf"], tok[:, None].astype(jnp.int32), state["n"], axis=1)
        return {**state, "buf": buf, "n": state["n"] + 1}

    def make_step(self, temperature: float, top_k: int | None, top_p: float | None) -> Callable:
        @partial(jax.jit, donate_argnums=(1,))
        def step(params, state, key):
            logits, state = self.logits(params, state)
            tok = sample(key, logits, temperature, top_k, top_p)
            return tok, logits, self.push(state, tok)

        return step


def state_bytes(state: dict) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def _prompt_array(prompt_ids, batch: int, vocab: int) -> np.ndarray:
    p = np.asarray(prompt_ids, dtype=np.int64)
    if p.ndim == 1:
        p = np.broadcast_to(p, (batch, p.shape[0]))
    if p.ndim != 2 or p.shape[0] != batch:
        raise PromptError(f"prompt ids must be a 1-D sequence or (batch={batch}, P), got shape {p.shape}")
    if p.shape[1] == 0:
        raise PromptError("the prompt is empty; give at least one token")
    if p.min() < 0 or p.max() >= vocab:
        bad = int(p.min() if p.min() < 0 else p.max())
        raise PromptError(f"prompt token id {bad} out of range; allowed 0..{vocab - 1}")
    return np.ascontiguousarray(p, dtype=np.int32)


def stream(model, prompt_ids: Sequence[int] | np.ndarray, *, max_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int = 0, batch: int = 1,
           carry: bool = True, with_logits: bool = False) -> Iterator:
    """Yield the next token ids (B,) (with `with_logits`: (ids, logits (B, vocab))), max_tokens
    times. The same prompt in every row when prompt_ids is 1-D; rows draw independently."""
    check_sampling(temperature, top_k, top_p)
    if max_tokens < 0:
        raise PromptError(f"max_tokens {max_tokens}: must be >= 0")
    prompt = _prompt_array(prompt_ids, batch, model.cfg.vocab_size)
    dec = Decoder(model, batch, carry=carry)
    state = dec.prefill(prompt)
    step = dec.make_step(temperature, top_k, top_p)
    key = jax.random.key(seed)
    for _ in range(max_tokens):
        key, sub = jax.random.split(key)
        tok, logits, state = step(dec.params, state, sub)
        yield (np.asarray(tok), np.asarray(logits)) if with_logits else np.asarray(tok)


def generate(model, prompt_ids, *, max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, batch: int = 1, carry: bool = True,
             on_token: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """The generated ids (B, max_tokens); `on_token(ids (B,))` is called as each is produced."""
    out = []
    for tok in stream(model, prompt_ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, batch=batch, carry=carry):
        if on_token is not None:
            on_token(tok)
        out.append(tok)
    return np.stack(out, axis=1) if out else np.zeros((batch, 0), np.int32)

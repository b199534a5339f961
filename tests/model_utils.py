"""Tiny model configs and a compiled forward shared by the model tests."""

import jax
import jax.numpy as jnp
from flax import nnx

from bst_dist import config

TINY = dict(vocab_size=64, d_model=32, num_layers=4, num_heads=2, head_dim=16, mlp_dim=64, block_len=8,
            seq_len=32, dtype="float32", bst_layers=[1], brect_layers=[2])


def tiny_cfg(**overrides) -> config.ModelConfig:
    """Every layer kind in one stack: [block, bst, brect, block]."""
    raw = dict(TINY)
    bst = {"state_size": 8, "num_context_states": 4}
    bst.update(overrides.pop("bst", {}))
    brect = {"num_states": 4}
    brect.update(overrides.pop("brect", {}))
    raw.update(overrides)
    raw["bst"], raw["brect"] = bst, brect
    return config.from_dict({"model": raw}).model


def compiled_forward(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, tokens, cache, doc_start):
        return nnx.merge(graphdef, state)(tokens, cache, doc_start)

    return lambda tokens, cache, doc_start: fwd(state, tokens, cache, doc_start)


def tokens(key, B, T, vocab=64):
    return jax.random.randint(jax.random.key(key), (B, T), 0, vocab, dtype=jnp.int32)


def naive_nll(logits, targets):
    """The tests' one reference cross-entropy: -log softmax(logits)[target] per token."""
    lp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
    return -jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], -1)[..., 0]

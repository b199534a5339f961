"""The model-level tests' tiny model, a compiled forward, random tokens and the reference
cross-entropy (shared by the models, generate and eval tests)."""

import jax
import jax.numpy as jnp
from flax import nnx

from tests.helpers.tiny import RANDOM_TOKENS, tiny_model

# The model-level tests' stack, [block, bst, brect, block]: the tiny model on random tokens, with
# a fourth layer and 4 MF context states.
MODEL_TESTS = {**RANDOM_TOKENS, "num_layers": 4, "bst": {"num_context_states": 4}}


def tiny_cfg(**overrides):
    """The ModelConfig of the model-level tests (MODEL_TESTS), with overrides merged key by key."""
    return tiny_model(MODEL_TESTS, overrides)


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

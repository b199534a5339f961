"""Decoding with the block state is exact: greedy decoding token by token gives, at every
position, the logits of a forward pass over the generated sequence cut into L-long sequences
with the cache carried (as training streams them), across block and L boundaries and after a
prefill of any length; the decoding state does not grow with the generated length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bst_dist.generate import decode, generate, stream
from bst_dist.generate.sampling import SamplingError
from bst_dist.models import build

from tests.helpers.models import tiny_cfg

ONLY = dict(num_layers=2, bst_layers=[], brect_layers=[])
KINDS = {
    "mixed_slide_bstSH_s4d_brect": {},  # [block, bst, brect, block]
    "bst_MF_unstruct": dict(ONLY, bst_layers=[1], bst={"variant": "MF", "kernel": "unstruct"}),
    "transformer_xl": dict(ONLY, block_len=16, seq_len=16),
    "slide": dict(ONLY),
    **{f"brect_{g}_{'skip' if s else 'dual'}": dict(ONLY, brect_layers=[1], brect={"gate": g, "skip": s})
       for g in ("fixed", "lstm") for s in (True, False)},
    **{f"bst_{v}_{k}": dict(ONLY, bst_layers=[1], bst={"variant": v, "kernel": k})
       for v in ("SH", "MH", "MF") for k in ("s4d", "unstruct")},
}
FAST = ("mixed_slide_bstSH_s4d_brect", "bst_MF_unstruct", "transformer_xl")
PARAMS = [pytest.param(k, marks=() if k in FAST else pytest.mark.slow) for k in KINDS]


def segmented_logits(model, seq: np.ndarray, carry: bool = True) -> np.ndarray:
    """Forward over `seq` (B, T) in L-long sequences (the last padded), cache carried."""
    B, T = seq.shape
    L = model.cfg.seq_len
    graphdef, params = nnx.split(model)
    fwd = jax.jit(lambda p, x, c: nnx.merge(graphdef, p)(x, c, jnp.zeros((B,), bool)))
    cache, out = model.init_cache(B), []
    for s in range(0, T, L):
        x = np.zeros((B, L), np.int32)
        x[:, :min(L, T - s)] = seq[:, s:s + L]
        logits, cache = fwd(params, jnp.asarray(x), cache)
        out.append(np.asarray(logits))
        if not carry:
            cache = model.init_cache(B)
    return np.concatenate(out, axis=1)[:, :T, :model.cfg.vocab_size]


def check_greedy_exact(model, prompt: np.ndarray, n: int, carry: bool = True):
    steps = list(stream(model, prompt, max_tokens=n, top_k=1, batch=prompt.shape[0], carry=carry,
                        with_logits=True))
    toks = np.stack([t for t, _ in steps], 1)
    got = np.stack([lg for _, lg in steps], 1)  # (B, n, V): logits predicting token P + i
    np.testing.assert_array_equal(toks, got.argmax(-1))
    seq = np.concatenate([prompt, toks], axis=1)
    ref = segmented_logits(model, seq, carry)[:, prompt.shape[1] - 1:-1]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", PARAMS)
def test_greedy_logits_equal_segmented_forward(kind):
    cfg = tiny_cfg(**KINDS[kind])
    model = build(cfg, nnx.Rngs(0))
    L = cfg.seq_len
    rng = np.random.default_rng(1)
    # prefill lengths: one token, a whole block, mid-block past L; each decodes across an L boundary
    # prefills of 1 token, one block and past L for the mixed stack (the block-long one under slow)
    lengths = (1, L + 3) if kind == "mixed_slide_bstSH_s4d_brect" else (1, cfg.block_len, L + 3) if kind not in FAST else (L + 3,)
    for P in lengths:
        prompt = rng.integers(0, cfg.vocab_size, (2, P)).astype(np.int32)
        check_greedy_exact(model, prompt, n=L + 5 - (P % L))


def test_no_carry_resets_at_every_L():
    cfg = tiny_cfg()
    model = build(cfg, nnx.Rngs(2))
    prompt = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 5)).astype(np.int32)
    check_greedy_exact(model, prompt, n=cfg.seq_len + 4, carry=False)


def test_state_size_is_independent_of_generated_length():
    cfg = tiny_cfg()
    model = build(cfg, nnx.Rngs(0))
    dec = decode.Decoder(model, batch=2)
    state = dec.prefill(np.ones((2, 3), np.int32))
    step = dec.make_step(1.0, None, None)
    sizes, key = set(), jax.random.key(0)
    for i in range(4 * cfg.seq_len):
        key, sub = jax.random.split(key)
        _, _, state = step(dec.params, state, sub)
        sizes.add(decode.state_bytes(state))
    assert len(sizes) == 1
    assert int(state["pos"]) + int(state["n"]) == 3 + 4 * cfg.seq_len  # it really advanced


def test_sampling_is_seeded_and_rows_differ():
    cfg = tiny_cfg(**KINDS["slide"])
    model = build(cfg, nnx.Rngs(0))
    a = generate(model, [1, 2, 3], max_tokens=12, temperature=2.0, seed=5, batch=3)
    b = generate(model, [1, 2, 3], max_tokens=12, temperature=2.0, seed=5, batch=3)
    c = generate(model, [1, 2, 3], max_tokens=12, temperature=2.0, seed=6, batch=3)
    seen = []
    generate(model, [1, 2, 3], max_tokens=4, seed=5, batch=3, on_token=seen.append)
    assert a.shape == (3, 12) and (a == b).all() and not (a == c).all()
    assert not (a[0] == a[1]).all()
    assert len(seen) == 4 and seen[0].shape == (3,)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"),
])
def test_bad_sampling_parameters(kwargs, match):
    model = build(tiny_cfg(**KINDS["slide"]), nnx.Rngs(0))
    with pytest.raises(SamplingError, match=match):
        generate(model, [1], max_tokens=1, **kwargs)


def test_bad_prompts():
    model = build(tiny_cfg(**KINDS["slide"]), nnx.Rngs(0))
    with pytest.raises(decode.PromptError, match="empty"):
        generate(model, [], max_tokens=1)
    with pytest.raises(decode.PromptError, match="out of range"):
        generate(model, [64], max_tokens=1)

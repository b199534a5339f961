"""Block attention against naive full-length masked attention; safe softmax; T5 buckets."""

import math

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from bst_dist.models import attention as attn

RNG = np.random.default_rng(1)


def naive_window_attention(q, k, v, k_prev, v_prev, prev_valid, alpha, table, W, strict, max_distance):
    """Full-length reference: keys are [prev (W); sequence (T)]; query at position p (W + p in the
    concatenation) sees keys at distance n in [0, W] (strict: [1, W]), prev keys only if valid."""
    B, T, H, hd = q.shape
    kk = np.concatenate([k_prev, k], 1)
    vv = np.concatenate([v_prev, v], 1)
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for p in range(T):
                qpos = W + p
                logits, vals = [], []
                for j in range(W + T):
                    n = qpos - j
                    if n < (1 if strict else 0) or n > W:
                        continue
                    if j < W and not prev_valid[b]:
                        continue
                    bucket = n if n < 16 else min(31, 16 + int(math.log(n / 16) / math.log(max_distance / 16) * 16))
                    logits.append(alpha[h] * (q[b, p, h] @ kk[b, j, h] + table[h, bucket]))
                    vals.append(vv[b, j, h])
                if logits:
                    w = np.exp(np.array(logits) - max(logits))
                    out[b, p, h] = (w / w.sum()) @ np.array(vals)
    return out


@pytest.mark.parametrize("strict", [False, True])
def test_block_attention_equals_naive(strict):
    B, T, H, hd, W = 2, 24, 2, 4, 8
    q, k, v = (RNG.normal(size=(B, T, H, hd)) for _ in range(3))
    kp, vp = RNG.normal(size=(B, W, H, hd)), RNG.normal(size=(B, W, H, hd))
    valid = np.array([True, False])
    alpha = RNG.uniform(0.5, 2, size=H)
    table = RNG.normal(size=(H, 32))
    got = attn.block_self_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, kp, vp)), jnp.asarray(valid),
                                    jnp.asarray(alpha, jnp.float32), attn.window_bias(jnp.asarray(table), W, 128),
                                    W, strict)
    want = naive_window_attention(q, k, v, kp, vp, valid, alpha, table, W, strict, 128)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    if strict:  # the first token of a fresh document sees nothing: exactly 0, not a mean of values
        assert np.all(np.asarray(got)[1, 0] == 0.0)


def test_fully_masked_row_outputs_zero():
    logits = jnp.asarray(RNG.normal(size=(3, 5)))
    mask = jnp.array([[True] * 5, [False] * 5, [True, False, False, False, False]])
    p = np.asarray(attn.masked_softmax(logits, mask))
    assert np.all(p[1] == 0) and p[2, 0] == pytest.approx(1.0)
    np.testing.assert_allclose(p[0], np.asarray(jax.nn.softmax(logits[0])), rtol=1e-6)


def test_t5_bucket_formula():
    n = np.arange(0, 600)
    want = [x if x < 16 else min(31, 16 + int(math.log(x / 16) / math.log(8) * 16)) for x in n]
    np.testing.assert_array_equal(np.asarray(attn.t5_bucket(jnp.asarray(n))), want)


def test_window_masks():
    inc = np.asarray(attn.window_mask(4, strict=False))
    st = np.asarray(attn.window_mask(4, strict=True))
    assert inc.sum(1).tolist() == [5] * 4 and st.sum(1).tolist() == [4] * 4
    assert inc[0, 4] and not st[0, 4]  # the token itself (query 0 sits at key 4)
    assert not inc[0, 5]  # never the future

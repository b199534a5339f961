"""Causality by perturbation: changing tokens after position t changes nothing at or before t,
for every layer kind (one hybrid stack: block, BST, BRecT), every BST combination and both mask
modes: inside a block, at a block's first position, across blocks, through the MF context shift
and through the carried cache."""

import numpy as np
import jax.numpy as jnp
import pytest
from flax import nnx

from bst_dist.models import build

from tests.helpers.models import compiled_forward, tiny_cfg, tokens

COMBOS = [(v, k, m) for v in ("SH", "MH", "MF") for k in ("s4d", "unstruct") for m in ("inclusive", "strict")]
# positions: a block's first token (0, 8, 16), inside a block (5, 13), a block's last (23), the end
POSITIONS = [0, 5, 8, 13, 16, 23, 30]


@pytest.mark.parametrize("variant,kernel,mask", COMBOS)
def test_no_future_leak(variant, kernel, mask):
    cfg = tiny_cfg(mask=mask, bst={"variant": variant, "kernel": kernel})
    model = build(cfg, nnx.Rngs(0))
    fwd = compiled_forward(model)
    B, L = 2, cfg.seq_len
    seq1, seq2 = tokens(1, B, L), tokens(2, B, L)
    fresh = model.init_cache(B)
    start = jnp.array([True, True])
    _, cache = fwd(seq1, fresh, start)  # seq2 reads seq1 through the cache (XL, SSM carry, MF, BRecT)
    cont = jnp.array([False, False])
    for cache_in, doc_start, label in ((fresh, start, "fresh"), (cache, cont, "carried")):
        base, _ = fwd(seq2, cache_in, doc_start)
        for t in POSITIONS:
            noise = tokens(100 + t, B, L - t - 1)
            pert = seq2.at[:, t + 1:].set(noise)
            out, _ = fwd(pert, cache_in, doc_start)
            np.testing.assert_allclose(np.asarray(out[:, : t + 1]), np.asarray(base[:, : t + 1]), rtol=1e-5,
                                       atol=1e-5, err_msg=f"{label} cache: position <= {t} saw the future")
            # the test can fail: the perturbed future itself does change
            assert not np.allclose(np.asarray(out[:, t + 1:]), np.asarray(base[:, t + 1:]), atol=1e-6)

"""Sharding from day one: the model under jit on 8 fake CPU devices with meshes (8,1,1), (2,4,1),
(2,2,2) gives the outputs of one device (float32, 1e-5 relative); gradients are finite; bad
inputs are one-line errors."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bst_dist import config, parallel
from bst_dist.models import InputError, build

from tests.helpers.models import compiled_forward, tiny_cfg, tokens



def sharded_forward(cfg, mesh_shape, B):
    mesh_cfg = config.MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    mesh = parallel.make_mesh(mesh_cfg)
    rules = parallel.rules_from_config(mesh_cfg)
    model = parallel.create_sharded(lambda: build(cfg, nnx.Rngs(0)), mesh, rules)
    graphdef, state = nnx.split(model)
    cache_sh = parallel.cache_shardings(model.cache_shape(B), mesh, rules)
    tok_sh = parallel.batch_sharding(mesh, 2, rules)

    @jax.jit
    def fwd(state, x, cache, start):
        logits, cache = nnx.merge(graphdef, state)(x, cache, start)
        return logits, cache

    def run(x, start):
        cache = jax.device_put(model.init_cache(B), cache_sh)
        x = jax.device_put(x, tok_sh)
        start = jax.device_put(start, parallel.batch_sharding(mesh, 1, rules))
        first, cache = fwd(state, x[:, :cfg.seq_len], cache, start)
        second, _ = fwd(state, x[:, cfg.seq_len:], cache, ~start)
        return np.asarray(first), np.asarray(second), state

    return run


# (2, 2, 2) splits every axis at once (data, fsdp and tensor): the default suite's case
@pytest.mark.parametrize("shape", [(2, 2, 2), pytest.param((8, 1, 1), marks=pytest.mark.slow),
                                   pytest.param((2, 4, 1), marks=pytest.mark.slow)])
def test_sharded_equals_single_device(shape):
    assert len(jax.devices()) == 8
    cfg = tiny_cfg(bst={"variant": "MF"})
    B = 8
    x = tokens(11, B, 2 * cfg.seq_len)
    start = jnp.ones((B,), bool)
    ref = build(cfg, nnx.Rngs(0))
    fwd = compiled_forward(ref)
    r1, c = fwd(x[:, :cfg.seq_len], ref.init_cache(B), start)
    r2, _ = fwd(x[:, cfg.seq_len:], c, ~start)
    s1, s2, state = sharded_forward(cfg, shape, B)(x, start)
    np.testing.assert_allclose(s1, np.asarray(r1), rtol=1e-5, atol=1e-5, err_msg=str(shape))
    np.testing.assert_allclose(s2, np.asarray(r2), rtol=1e-5, atol=1e-5, err_msg=str(shape))
    if shape == (2, 2, 2):  # parameters really are split: the embedding over tensor x fsdp
        emb = state["embed"][...]
        assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
        assert emb.addressable_shards[0].data.shape == (emb.shape[0] // 2, emb.shape[1] // 2)


@pytest.mark.parametrize("variant,kernel", [("SH", "s4d"), pytest.param("MH", "unstruct", marks=pytest.mark.slow),
                                            pytest.param("MF", "s4d", marks=pytest.mark.slow)])
def test_gradients_are_finite_for_every_layer_kind(variant, kernel):
    cfg = tiny_cfg(bst={"variant": variant, "kernel": kernel}, brect={"gate": "lstm"})
    model = build(cfg, nnx.Rngs(1))
    B = 2
    x = tokens(3, B, cfg.seq_len + 1)

    def loss_fn(model):
        logits, _ = model(x[:, :-1], model.init_cache(B), jnp.ones((B,), bool))
        lp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(lp, x[:, 1:, None], -1))

    grads = nnx.grad(loss_fn)(model)
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]
    assert flat and all(bool(jnp.all(jnp.isfinite(g))) for _, g in flat)
    # every parameter takes part in the loss of a fresh sequence (initial states included)
    dead = [jax.tree_util.keystr(p) for p, g in flat if float(jnp.abs(g).sum()) == 0]
    assert not dead, f"{variant}:{kernel}: parameters without a gradient: {dead}"


def test_bad_inputs_are_clear_errors():
    cfg = tiny_cfg()
    model = build(cfg, nnx.Rngs(0))
    cache = model.init_cache(2)
    ok = jnp.zeros((2, 32), jnp.int32)
    start = jnp.ones((2,), bool)
    with pytest.raises(InputError, match=r"token id 64 out of range; allowed 0..63"):
        model(ok.at[0, 3].set(64), cache, start)
    with pytest.raises(InputError, match=r"T=30; T must be a positive multiple of block_len W=8"):
        model(ok[:, :30], cache, start)
    with pytest.raises(InputError, match=r"cache was built for batch size 2 but tokens have B=3"):
        model(jnp.zeros((3, 32), jnp.int32), cache, jnp.ones((3,), bool))
    # concrete tokens closed over inside jit / grad are checked too, without a concretization error
    jax.jit(lambda c: model(ok, c, start)[0])(cache)
    bad = ok.at[0, 3].set(64)
    with pytest.raises(InputError, match=r"token id 64 out of range"):
        jax.jit(lambda c: model(bad, c, start)[0])(cache)
    jax.grad(lambda c: jnp.sum(model(ok, c, start)[0]), allow_int=True)(cache)
    # any T that is a multiple of W works (length generalisation), not only the configured L
    logits, _ = model(jnp.zeros((2, 48), jnp.int32), cache, start)
    assert logits.shape == (2, 48, cfg.padded_vocab)

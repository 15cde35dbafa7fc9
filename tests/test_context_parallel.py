"""Context parallelism (ulysses, ring) vs unsharded attention, and in training, on 8 CPU devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from lidit_jax import configuration
from lidit_jax.nn.attention import dot_product_attention
from lidit_jax.parallel import context, sharding
from test_train_step import train
from train_helpers import make_mesh, random_batch, tiny_config

RULES = common.DEFAULT_SHARDING_RULES


def _forward_and_grads(attend, q, k, v, key_mask, cotangent):
    def loss(q, k, v):
        out = attend(q, k, v, key_mask=key_mask)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


# (data, fsdp, tensor, context), heads: context alone, and composed with data and tensor.
MESHES = {"context8": ((1, 1, 1, 8), 8), "data2_tensor2_context2": ((2, 1, 2, 2), 4)}


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_matches_unsharded_attention_forward_and_gradients(strategy, mesh_name):
    (data, fsdp, tensor, ctx), heads = MESHES[mesh_name]
    rng = np.random.default_rng(0)
    shape = (2, 32, heads, 8)
    q, k, v, cotangent = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(4))
    # Padded keys, including a whole context shard of padding for row 1 (ring: a chunk whose
    # keys are all masked must merge with weight 0).
    key_mask = jnp.asarray(np.arange(32)[None] < np.array([[29], [3]]))
    expected, expected_grads = _forward_and_grads(dot_product_attention, q, k, v, key_mask,
                                                  cotangent)
    mesh = make_mesh(data, fsdp, tensor, context=ctx)
    attend = functools.partial(context.context_parallel_attention, strategy=strategy)
    with jax.set_mesh(mesh), sharding.axis_rules(RULES):
        assert context.context_size() == ctx
        out, grads = _forward_and_grads(attend, q, k, v, key_mask, cotangent)
        lowered = jax.jit(lambda q, k, v: attend(q, k, v)).lower(q, k, v).as_text()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    for g, g_expected in zip(grads, expected_grads):
        np.testing.assert_allclose(g, g_expected, rtol=1e-4, atol=1e-5)
    collective = {"ulysses": "all_to_all", "ring": "collective_permute"}[strategy]
    assert collective in lowered  # Really sharded, not gathered by the partitioner.


def test_ring_saves_no_attention_matrix_for_the_backward():
    """The ring's custom VJP keeps q, k, v, the output and one float32 log-sum-exp per row: the
    backward recomputes each chunk's probabilities, so no residual grows with L * L / c (autodiff
    of the hops kept [batch, heads, L/c, L] per device)."""
    batch, length, heads, head_dim, ctx = 2, 64, 2, 4, 8
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
               for _ in range(3))
    key_mask = jnp.asarray(np.arange(length)[None] < np.array([[60], [17]]))
    attend = functools.partial(context.context_parallel_attention, strategy="ring",
                               key_mask=key_mask)
    with jax.set_mesh(make_mesh(1, 1, 1, context=ctx)), sharding.axis_rules(RULES):
        _, backward = jax.vjp(attend, q, k, v)
    residual_sizes = [x.size for x in jax.tree.leaves(backward) if hasattr(x, "size")]
    assert residual_sizes
    activation = batch * length * heads * head_dim
    assert max(residual_sizes) <= activation


def test_ulysses_heads_must_split_over_context():
    mesh = make_mesh(1, 1, 1, context=8)
    q = jnp.zeros((1, 16, 4, 8))
    with jax.set_mesh(mesh), sharding.axis_rules(RULES), pytest.raises(ValueError, match="ring"):
        context.context_parallel_attention(q, q, q, strategy="ulysses")


def test_config_validation_names_the_keys():
    config = common.get_config()
    config.mesh.data, config.mesh.context = -1, 2
    with pytest.raises(configuration.ConfigError, match="model.context_parallel"):
        configuration.validate(config, num_devices=8)
    config.model.context_parallel = "ulysses"
    config.model.heads, config.model.width = 3, 240
    with pytest.raises(configuration.ConfigError, match="mesh.tensor \\* mesh.context"):
        configuration.validate(config, num_devices=8)
    config.model.splash_block_q = 100
    with pytest.raises(configuration.ConfigError, match="model.splash_block_q"):
        configuration.validate(config)


@functools.lru_cache(maxsize=None)
def _losses(context_size, strategy):
    config = tiny_config()
    config.mesh.context = context_size
    config.model.context_parallel = strategy
    batches = [random_batch(seed) for seed in range(3)]
    # Same 8 devices: data 8, or data 4 x context 2 (16 image tokens, 8 per shard).
    mesh = make_mesh(8 // context_size, 1, 1, context=context_size)
    configuration.validate(config, num_devices=8)
    _, losses, _ = train(config, mesh, batches)
    return losses


@pytest.mark.slow  # Three tiny trainings: ~1 min each on 2 shared cores.
@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_three_training_steps_with_context_2_equal_context_1(strategy):
    np.testing.assert_allclose(_losses(2, strategy), _losses(1, "none"), rtol=1e-4)

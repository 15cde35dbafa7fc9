"""Context parallelism (all_gather, ulysses, ring) vs unsharded attention, and in training, on
8 CPU devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from lidit_jax import aot_compile, configuration
from lidit_jax.nn.attention import dot_product_attention
from lidit_jax.nn import context_parallel as context
from lidit_jax.parallel import sharding
from lidit_jax.parallel import mesh as mesh_lib
from train_helpers import make_mesh, random_batch, tiny_config, train

RULES = common.DEFAULT_SHARDING_RULES


def _forward_and_grads(attend, q, k, v, key_mask, cotangent):
    def loss(q, k, v):
        out = attend(q, k, v, key_mask=key_mask)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


# (data, fsdp, tensor, context), heads: context alone, and composed with data, fsdp and tensor.
MESHES = {"context8": ((1, 1, 1, 8), 8), "data2_tensor2_context2": ((2, 1, 2, 2), 4),
          "fsdp2_tensor2_context2": ((1, 2, 2, 2), 4), "fsdp2_context4": ((1, 2, 1, 4), 4)}
COLLECTIVES = {"all_gather": "all_gather", "ulysses": "all_to_all", "ring": "collective_permute"}


def _random_inputs(heads, seed=0):
    """q, k, v, cotangent [2, 32, heads, 8] and a key_mask [2, 32] padding row 0 to 29 keys and
    row 1 to 3, so row 1 has whole context shards of padding (ring: a chunk whose keys are all
    masked must merge with weight 0; all_gather: a shard whose own keys are all padding)."""
    rng = np.random.default_rng(seed)
    shape = (2, 32, heads, 8)
    q, k, v, cotangent = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(4))
    key_mask = jnp.asarray(np.arange(32)[None] < np.array([[29], [3]]))
    return q, k, v, cotangent, key_mask


def _assert_matches_unsharded(strategy, mesh, heads, implementation="xla"):
    q, k, v, cotangent, key_mask = _random_inputs(heads)
    expected, expected_grads = _forward_and_grads(dot_product_attention, q, k, v, key_mask,
                                                  cotangent)
    attend = functools.partial(context.context_parallel_attention, strategy=strategy,
                               implementation=implementation)
    with jax.set_mesh(mesh), sharding.axis_rules(RULES):
        out, grads = _forward_and_grads(attend, q, k, v, key_mask, cotangent)
        lowered = jax.jit(lambda q, k, v: attend(q, k, v)).lower(q, k, v).as_text()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    for g, g_expected in zip(grads, expected_grads):
        np.testing.assert_allclose(g, g_expected, rtol=1e-4, atol=1e-5)
    assert COLLECTIVES[strategy] in lowered  # Really sharded, not gathered by the partitioner.
    return lowered


@pytest.mark.parametrize("strategy", ["all_gather", "ulysses", "ring"])
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_matches_unsharded_attention_forward_and_gradients(strategy, mesh_name):
    (data, fsdp, tensor, ctx), heads = MESHES[mesh_name]
    mesh = make_mesh(data, fsdp, tensor, context=ctx)
    with jax.set_mesh(mesh):
        assert context.context_size() == ctx
    _assert_matches_unsharded(strategy, mesh, heads)


def test_all_gather_takes_heads_ulysses_refuses():
    """Three heads over context 4 (with fsdp 2): ulysses cannot split them, all_gather needs
    no split (it gathers the sequence, not the heads) and matches unsharded attention."""
    mesh = make_mesh(1, 2, 1, context=4)
    q = jnp.zeros((2, 32, 3, 8))
    with jax.set_mesh(mesh), sharding.axis_rules(RULES), pytest.raises(ValueError, match="ulysses"):
        context.context_parallel_attention(q, q, q, strategy="ulysses")
    lowered = _assert_matches_unsharded("all_gather", mesh, heads=3)
    assert "all_to_all" not in lowered and "collective_permute" not in lowered


def test_all_gather_runs_the_configured_kernel():
    """implementation='splash' (Pallas interpret mode off TPU) on the local queries [b, L/c]
    against the gathered keys [b, L]: ring would ignore it and run XLA."""
    lowered = _assert_matches_unsharded("all_gather", make_mesh(1, 2, 2, context=2), heads=4,
                                        implementation="splash")
    assert "splash" in lowered


def test_all_gather_auto_chooses_for_the_whole_sequence():
    """`auto` on a TPU target (libtpu's v5p devices, lowering only): 1024 tokens over context 4
    leave 256 local queries, under AUTO_MIN_SEQ_LEN, yet attend to 1024 gathered keys, so the
    choice is splash (a Mosaic custom call), as for unsharded attention, not XLA's logits."""
    devices = np.array(aot_compile.topology_devices("v5p:2x2x1")).reshape(1, 1, 4, 1)
    mesh = jax.sharding.Mesh(devices, mesh_lib.MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 4)
    x = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
    attend = functools.partial(context.context_parallel_attention, strategy="all_gather",
                               implementation="auto")
    with jax.set_mesh(mesh), sharding.axis_rules(RULES):
        lowered = jax.jit(attend).lower(x, x, x).as_text()
    assert "tpu_custom_call" in lowered


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
        # Jitted (the backward closure is a pytree of its residuals): one compile, not op by op.
        backward = jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1])(q, k, v)
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
    config.model.context_parallel = "all_gather"  # No head constraint.
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


@pytest.mark.slow  # Four tiny trainings: ~1 min each on 2 shared cores.
@pytest.mark.parametrize("strategy", ["all_gather", "ulysses", "ring"])
def test_three_training_steps_with_context_2_equal_context_1(strategy):
    np.testing.assert_allclose(_losses(2, strategy), _losses(1, "none"), rtol=1e-4)

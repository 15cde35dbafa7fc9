"""model.position_embedding: the sin-cos table and 2-D rotary codes, and what each lets the DiT see."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lidit_jax import configuration
from lidit_jax.diffusion import dit
from lidit_jax.nn import positions
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.parallel import sharding
from train_helpers import apply, backbone_inputs, dit_config, randomize


def test_sincos_table_matches_the_formula():
    height, width, dim = 3, 5, 16
    table = np.asarray(positions.sincos_2d(height, width, dim))
    frequencies = 10000.0**(-np.arange(4) / 4)
    for r in range(height):
        for c in range(width):
            expected = np.concatenate([np.sin(r * frequencies), np.cos(r * frequencies),
                                       np.sin(c * frequencies), np.cos(c * frequencies)])
            np.testing.assert_allclose(table[r, c], expected, atol=1e-6)


def test_rope_scores_depend_on_the_offset_only():
    """q.k after rotation is the same for every pair of tokens with the same (dr, dc)."""
    rng = np.random.default_rng(0)
    height, width, head_dim = 6, 7, 16
    q = jnp.asarray(rng.standard_normal((1, 1, 1, head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, head_dim)), jnp.float32)
    cos, sin = positions.rope_2d(height, width, head_dim)
    tokens = height * width
    rotated_q = positions.apply_rope(jnp.broadcast_to(q, (1, tokens, 1, head_dim)), (cos, sin))
    rotated_k = positions.apply_rope(jnp.broadcast_to(k, (1, tokens, 1, head_dim)), (cos, sin))
    scores = np.asarray(jnp.einsum("bqhd,bkhd->qk", rotated_q, rotated_k))
    index = lambda r, c: r * width + c  # noqa: E731
    for (r1, c1), (r2, c2), (dr, dc) in [((0, 0), (2, 3), (1, 1)), ((1, 4), (0, 2), (3, 2)),
                                         ((5, 6), (4, 4), (-2, -3))]:
        np.testing.assert_allclose(scores[index(r1, c1), index(r2, c2)],
                                   scores[index(r1 + dr, c1 + dc), index(r2 + dr, c2 + dc)],
                                   rtol=1e-4, atol=1e-4)
    # Different offsets give different scores, and norms are kept (a rotation).
    assert abs(scores[index(0, 0), index(0, 1)] - scores[index(0, 0), index(1, 0)]) > 1e-3
    np.testing.assert_allclose(jnp.linalg.norm(rotated_q, axis=-1), jnp.linalg.norm(q), rtol=1e-5)


def interior_spread(position_embedding, seed=0):
    """Largest difference between the DiT's outputs at interior tokens of a constant image:
    tokens > 2 cells from every border, whose inputs and text are identical."""
    backbone = randomize(dit.DiTBackbone(
        dit_config(position_embedding=position_embedding, patch_size=1).model, 4,
        rngs=nnx.Rngs(seed)), seed + 1)
    x, c, context, mask = backbone_inputs(1, (12, 12), 4, seed + 2)
    x = jnp.broadcast_to(x[:, :1, :1, :], x.shape)  # Every pixel the same.
    interior = np.asarray(apply(backbone, x, c, context, mask))[0, 3:-3, 3:-3].reshape(-1, 4)
    return float(np.max(np.abs(interior - interior[0]))), float(np.std(interior))


@pytest.mark.slow
def test_which_codes_give_interior_tokens_a_position():
    """The demo's diagnosis in one test. On a constant image, interior tokens have identical
    inputs. ResBlock alone: the convs see two cells and attention is permutation-equivariant, so
    they stay identical (no absolute position away from the borders). RoPE alone: scores depend
    on offsets only and every value is the same, so they stay identical too (rotary codes are
    relative). A sin-cos table, or the ResBlock's border tokens seen through rotary offsets,
    tells them apart."""
    for code in ("resblock", "rope"):
        spread, _ = interior_spread(code)
        assert spread < 1e-5, code
    for code in ("sincos", "resblock+sincos", "resblock+rope"):
        spread, scale = interior_spread(code)
        assert spread > 1e-3 * max(scale, 1e-3), code


@pytest.mark.parametrize("code", ["sincos", "rope", "resblock+rope"])
@pytest.mark.parametrize("hw", [(32, 64), (6, 10)])
def test_every_code_runs_at_any_size(code, hw):
    backbone = randomize(dit.DiTBackbone(dit_config(position_embedding=code).model, 4,
                                         rngs=nnx.Rngs(0)), 1)
    x, c, context, mask = backbone_inputs(2, hw, 4, 2)
    out = apply(backbone, x, c, context, mask)
    assert out.shape == x.shape and np.all(np.isfinite(out))


def test_parameters_follow_the_choice():
    def count(code):
        module = dit.DiTBackbone(dit_config(position_embedding=code).model, 4, rngs=nnx.Rngs(0))
        return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))

    assert count("rope") == count("sincos") < count("resblock") == count("resblock+rope")


@pytest.mark.parametrize("strategy", ["all_gather", "ulysses", "ring"])
def test_rope_with_context_parallelism_equals_one_device(strategy):
    config = dit_config(position_embedding="resblock+rope", context_parallel=strategy)
    single = randomize(dit.DiTBackbone(config.model, 4, rngs=nnx.Rngs(0)), 1)
    x, c, context, mask = backbone_inputs(2, (8, 8), 4, 2)
    expected = apply(single, x, c, context, mask)

    config.mesh.data, config.mesh.fsdp, config.mesh.context = 2, 2, 2
    mesh = mesh_lib.build_mesh(config.mesh)
    with jax.set_mesh(mesh), sharding.axis_rules(config.mesh.rules):
        out = apply(single, x, c, context, mask)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-4)


def test_config_refuses_codes_the_shapes_cannot_carry():
    config = dit_config()
    config.model.position_embedding = "alibi"
    with pytest.raises(configuration.ConfigError, match="model.position_embedding"):
        configuration.validate(config)
    config.model.position_embedding, config.model.width, config.model.heads = "rope", 72, 4
    with pytest.raises(configuration.ConfigError, match="divisible by 4"):
        configuration.validate(config)

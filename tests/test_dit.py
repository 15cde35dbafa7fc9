"""LI-DiT backbone: shapes at any resolution, zero init, scan/loop/remat agreement, text masking,
1-device vs 8-device parity, logical axes, and the 1B/10B parameter counts (describe)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from lidit_jax import describe
from lidit_jax.diffusion import dit
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.parallel import sharding
from train_helpers import apply, backbone_inputs, dit_config, normal, randomize

LLM_WIDTHS = [48]


def text_inputs(batch, seed, lengths=(7,), widths=LLM_WIDTHS):
    rng = np.random.default_rng(seed)
    states = [normal(rng, batch, n, w) for n, w in zip(lengths, widths)]
    # Example i sees 2 + i % n tokens; the rest is padding.
    masks = [jnp.arange(n)[None, :] < (jnp.arange(batch)[:, None] % n + 2) for n in lengths]
    return [{"states": s, "mask": m, "prompt_mask": m} for s, m in zip(states, masks)]


@pytest.mark.parametrize("hw", [(32, 32), (32, 64), (48, 32), (6, 10)])
def test_any_resolution_keeps_shape(hw):
    backbone = randomize(dit.DiTBackbone(dit_config().model, 4, rngs=nnx.Rngs(0)), 1)
    x, c, context, mask = backbone_inputs(2, hw, 4, 2)
    out = apply(backbone, x, c, context, mask)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(out)) and float(jnp.std(out)) > 0


def test_lidit_forward_shape_and_zero_init():
    model = dit.LIDiT(dit_config(), LLM_WIDTHS, 3, rngs=nnx.Rngs(0))
    x = normal(np.random.default_rng(0), 2, 16, 24, 3)
    out = apply(model, x, jnp.array([10.0, 900.0]), text_inputs(2, 1))
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, 0.0)  # Zero-initialised output layer.
    blocks = model.backbone.blocks
    for module in (blocks.modulation, model.backbone.final.modulation, model.backbone.final.out):
        np.testing.assert_array_equal(module.kernel[...], 0.0)
        np.testing.assert_array_equal(module.bias[...], 0.0)


def test_gates_are_zero_at_init():
    block = dit.DiTBlock(64, 4, 4.0, qk_norm=True, implementation="xla", dtype=jnp.float32,
                         param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    c = normal(np.random.default_rng(0), 3, 64)
    vectors = nnx.jit(dit.DiTBlock.modulation_vectors)(block, c)
    assert len(vectors) == 9
    for v in vectors:
        np.testing.assert_array_equal(v, 0.0)
    x, c, context, mask = backbone_inputs(3, (4, 4), 64, 1, text_len=5)
    tokens = x.reshape(3, 16, 64)
    np.testing.assert_allclose(apply(block, tokens, c, context, mask), tokens, atol=1e-6)


@pytest.mark.slow
def test_scan_and_loop_and_remat_agree():
    config = dit_config()
    scanned = randomize(dit.DiTBackbone(config.model, 4, rngs=nnx.Rngs(0)), 1)
    stacked = nnx.state(scanned.blocks, nnx.Param)
    inputs = backbone_inputs(2, (8, 12), 4, 2)

    def loss(module):
        return jnp.sum(jnp.square(module(*inputs)))

    loss_and_grad = nnx.jit(nnx.value_and_grad(loss))
    reference, grads = loss_and_grad(scanned)

    looped = dit.DiTBackbone(dit_config(scan_layers=False).model, 4, rngs=nnx.Rngs(0))
    nnx.update(looped, nnx.state(scanned, nnx.Not(nnx.PathContains("blocks"))))
    for i, block in enumerate(looped.blocks):
        nnx.update(block, jax.tree.map(lambda a: a[i], stacked))
    np.testing.assert_allclose(nnx.jit(loss)(looped), reference, rtol=1e-5)

    for remat in ("full", "dots_saveable"):
        rematted = dit.DiTBackbone(dit_config(remat=remat).model, 4, rngs=nnx.Rngs(0))
        nnx.update(rematted, nnx.state(scanned))
        value, remat_grads = loss_and_grad(rematted)
        np.testing.assert_allclose(value, reference, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
                     remat_grads, grads)


def test_padded_text_tokens_are_ignored():
    backbone = randomize(dit.DiTBackbone(dit_config().model, 4, rngs=nnx.Rngs(0)), 1)
    x, c, context, mask = backbone_inputs(2, (8, 8), 4, 2)
    padding = ~mask[..., None]
    changed = jnp.where(padding, 100.0 * normal(np.random.default_rng(3), *context.shape),
                        context)
    reference = apply(backbone, x, c, context, mask)
    np.testing.assert_allclose(apply(backbone, x, c, changed, mask), reference, atol=1e-6)
    assert not np.allclose(apply(backbone, x, c, context + 1.0, mask), reference)


def test_bfloat16_compute_float32_params():
    config = dit_config(dtype="bfloat16")
    backbone = randomize(dit.DiTBackbone(config.model, 4, rngs=nnx.Rngs(0)), 1)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(backbone, nnx.Param)))
    reference = dit.DiTBackbone(dit_config().model, 4, rngs=nnx.Rngs(0))
    nnx.update(reference, nnx.state(backbone))
    inputs = backbone_inputs(2, (8, 8), 4, 2)
    out, expected = apply(backbone, *inputs), apply(reference, *inputs)
    assert out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - expected))) < 0.05 * float(jnp.max(jnp.abs(expected)))


def test_bfloat16_residual_stream():
    # The stream between blocks is stored in bf16 (each update still added in float32): the
    # output stays within bf16 rounding of the float32 stream on the same weights.
    config = dit_config(dtype="bfloat16", residual_dtype="bfloat16")
    backbone = randomize(dit.DiTBackbone(config.model, 4, rngs=nnx.Rngs(0)), 1)
    reference = dit.DiTBackbone(dit_config(dtype="bfloat16").model, 4, rngs=nnx.Rngs(0))
    nnx.update(reference, nnx.state(backbone))
    x, c, context, mask = backbone_inputs(2, (8, 8), 4, 2)
    assert backbone.position(jnp.ones((2, 4, 4, 64), jnp.bfloat16)).dtype == jnp.bfloat16
    out, expected = apply(backbone, x, c, context, mask), apply(reference, x, c, context, mask)
    assert out.dtype == jnp.float32
    error = float(jnp.max(jnp.abs(out - expected)))
    assert 0 < error < 0.02 * float(jnp.max(jnp.abs(expected)))


def test_bad_input_names_the_problem():
    backbone = dit.DiTBackbone(dit_config().model, 4, rngs=nnx.Rngs(0))
    x, c, context, mask = backbone_inputs(1, (9, 8), 4, 0)
    with pytest.raises(ValueError, match="patch_size"):
        backbone(x, c, context, mask)
    with pytest.raises(ValueError, match="in_channels=4"):
        backbone(x[..., :3], c, context, mask)
    with pytest.raises(ValueError, match="model.remat"):
        dit.DiTBackbone(dit_config(remat="some").model, 4, rngs=nnx.Rngs(0))


def test_every_parameter_has_logical_axes():
    abstract = nnx.eval_shape(lambda: dit.LIDiT(dit_config(), LLM_WIDTHS, 3,
                                                rngs=nnx.Rngs(0)))
    rules = dict(common.DEFAULT_SHARDING_RULES)
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = variable.get_metadata().get("out_sharding")
        name = ".".join(map(str, path))
        assert axes is not None and len(axes) == variable.ndim, name
        assert all(a in rules for a in axes if a is not None), name
        if path[:2] == ("backbone", "blocks"):
            assert axes[0] == "layers" and variable.shape[0] == 2, name


@pytest.mark.slow
def test_one_and_eight_devices_agree():
    config = dit_config()
    x = normal(np.random.default_rng(0), 4, 8, 16, 3)
    t = jnp.array([1.0, 250.0, 600.0, 999.0])
    text = text_inputs(4, 1)
    single = randomize(dit.LIDiT(config, LLM_WIDTHS, 3, rngs=nnx.Rngs(0)), 2)
    expected = apply(single, x, t, text)

    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
    mesh = mesh_lib.build_mesh(config.mesh)
    rules = config.mesh.rules
    abstract = nnx.state(nnx.eval_shape(lambda: dit.LIDiT(config, LLM_WIDTHS, 3,
                                                          rngs=nnx.Rngs(0))))
    shardings = sharding.checked_shardings(abstract, mesh, rules, check_replicated=False)
    graphdef, weights = nnx.split(single)
    sharded = nnx.merge(graphdef, jax.device_put(weights, shardings))
    kernel = sharded.backbone.blocks.mlp.up.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        out = apply(sharded, x, t, text)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-4)
    assert float(jnp.std(expected)) > 1e-3


# 25 d^2 per block (diffusion/dit.py): the paper gives shapes and names, no parameter counts.
@pytest.mark.parametrize("name,block_arithmetic", [("lidit_1b", 0.93e9), ("lidit_10b", 9.5e9)])
def test_sizes_within_five_percent_of_the_block_arithmetic(name, block_arithmetic):
    config = __import__(f"configs.{name}", fromlist=["get_config"]).get_config()
    table = describe.describe(config, [4096, 4096])
    lines = table.splitlines()
    assert lines[-2].startswith("dit_params=") and lines[-1].startswith("refiner_params=")
    dit_params = int(lines[-2].split("=")[1])
    assert abs(dit_params / block_arithmetic - 1) < 0.05, (dit_params, block_arithmetic)
    assert int(lines[-1].split("=")[1]) > 0
    assert "backbone.blocks" in table


def test_lidit_samples_with_guidance_under_nnx_jit():
    import functools

    from lidit_jax.diffusion import objectives, samplers

    config = dit_config()
    model = randomize(dit.LIDiT(config, LLM_WIDTHS, 3, rngs=nnx.Rngs(0)), 3)
    objective = objectives.make_objective(config.diffusion)
    cond = text_inputs(2, 4)
    uncond = jax.tree.map(lambda a: a[:1], text_inputs(1, 5))

    @functools.partial(nnx.jit, static_argnames="steps")
    def generate(model, key, cond, uncond, steps):
        return samplers.sample(samplers.denoiser(model), objective, (2, 8, 12, 3), key,
                               sampler="dpm++2m", steps=steps, guidance_scale=4.5, cond=cond,
                               uncond=uncond)

    images = generate(model, jax.random.key(0), cond, uncond, steps=3)
    assert images.shape == (2, 8, 12, 3) and np.all(np.isfinite(images))
    np.testing.assert_array_equal(images, generate(model, jax.random.key(0), cond, uncond, steps=3))

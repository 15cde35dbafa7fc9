"""Logical rules -> PartitionSpecs, sharded state creation, the replication check."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import common
from lidit_jax.nn.layers import MLP
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.parallel import sharding

RULES = common.DEFAULT_SHARDING_RULES


def make_mesh(data, fsdp, tensor):
    config = common.get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    return mesh_lib.build_mesh(config.mesh)


def test_rules_to_partition_specs():
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), RULES) == P("fsdp", "tensor")
    assert sharding.logical_to_mesh_spec(("batch", "length", "embed"), RULES) == P(("data", "fsdp"), "context", None)
    assert sharding.logical_to_mesh_spec(("layers", None, "heads"), RULES) == P(None, None, "tensor")
    with pytest.raises(KeyError, match="'nonexistent'.*mesh.rules"):
        sharding.logical_to_mesh_spec(("nonexistent",), RULES)


def test_dimension_not_divisible_is_replicated():
    mesh = make_mesh(1, 8, 1)
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), RULES, mesh, (12, 16)) == P(None, "tensor")
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), RULES, mesh, (16, 16)) == P("fsdp", "tensor")


def test_rules_with_unknown_mesh_axis():
    with pytest.raises(ValueError, match="'stage'.*do not exist"):
        sharding.validate_rules((("embed", "stage"),), mesh_lib.MESH_AXES)


def test_sharded_init_holds_one_eighth_per_device_under_fsdp():
    mesh = make_mesh(1, 8, 1)
    model = sharding.create_sharded(
        lambda: MLP(512, 2048, activation="silu", gated=True, use_bias=False, rngs=nnx.Rngs(0)),
        mesh, RULES)
    kernel = model.up.kernel[...]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    full_bytes = kernel.size * kernel.dtype.itemsize
    per_device = {s.device: s.data.nbytes for s in kernel.addressable_shards}
    assert len(per_device) == 8 and all(b == full_bytes // 8 for b in per_device.values())
    totals = sharding.bytes_per_device(nnx.state(model, nnx.Param))
    all_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert all(b == all_bytes // 8 for b in totals.values())


def test_sharded_init_equals_unsharded_values_and_outputs():
    make = lambda: MLP(256, 512, rngs=nnx.Rngs(3))  # noqa: E731
    reference = make()
    x = jax.random.normal(jax.random.key(0), (8, 5, 256))
    expected = reference(x)
    for sizes in [(1, 1, 1), (2, 2, 2), (1, 8, 1)]:
        mesh = make_mesh(*sizes) if sizes != (1, 1, 1) else jax.sharding.Mesh(
            np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), mesh_lib.MESH_AXES,
            axis_types=(jax.sharding.AxisType.Auto,) * 4)
        model = sharding.create_sharded(make, mesh, RULES)
        np.testing.assert_array_equal(model.down.kernel[...], reference.down.kernel[...])
        with jax.set_mesh(mesh), sharding.axis_rules(RULES):
            out = jax.jit(lambda m, v: m(sharding.constrain(v, ("batch", "length", "embed"))))(model, x)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_large_replicated_parameter_fails_the_check():
    mesh = make_mesh(1, 8, 1)
    rules = tuple((k, None if k in ("embed", "mlp") else v) for k, v in RULES)
    with pytest.raises(ValueError, match="replicated on every device.*up.kernel"):
        sharding.create_sharded(lambda: MLP(512, 2048, rngs=nnx.Rngs(0)), mesh, rules,
                                replicated_min_size=512 * 1024)
    model = sharding.create_sharded(lambda: MLP(512, 2048, rngs=nnx.Rngs(0)), mesh, rules,
                                    check_replicated=False)
    assert model.up.kernel[...].sharding.is_fully_replicated


def test_constrain_is_noop_outside_mesh():
    x = jnp.ones((2, 3))
    assert sharding.constrain(x, ("batch", "embed")) is x

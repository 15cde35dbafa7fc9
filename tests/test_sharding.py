"""Logical rules -> PartitionSpecs, sharded state creation, the parameter and batch-row checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import common, demo_shapes, lidit_1b, lidit_10b
from configs.ablations import base as ablation_base
from lidit_jax import aot_compile, configuration
from lidit_jax.diffusion.dit import LIDiT
from lidit_jax.nn.layers import MLP
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.parallel import sharding
from lidit_jax.train.state import abstract_train_state

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


def test_activation_dimension_not_divisible_is_replicated():
    mesh = make_mesh(1, 8, 1)
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), RULES, mesh, (12, 16)) == P(None, "tensor")
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), RULES, mesh, (16, 16)) == P("fsdp", "tensor")


def create_sharded(make, mesh, rules, **check):
    """`make()` (an nnx module) created directly in its shards, by the library's one path."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = sharding.checked_shardings(abstract, mesh, rules, **check)
    return nnx.merge(graphdef, sharding.init_in_shards(lambda: nnx.state(make()), shardings,
                                                       mesh, rules))


def test_rules_with_unknown_mesh_axis():
    with pytest.raises(ValueError, match="'stage'.*do not exist"):
        sharding.validate_rules((("embed", "stage"),), mesh_lib.MESH_AXES)


def test_sharded_init_holds_one_eighth_per_device_under_fsdp():
    mesh = make_mesh(1, 8, 1)
    model = create_sharded(
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
        model = create_sharded(make, mesh, RULES)
        np.testing.assert_array_equal(model.down.kernel[...], reference.down.kernel[...])
        with jax.set_mesh(mesh), sharding.axis_rules(RULES):
            out = jax.jit(lambda m, v: m(sharding.constrain(v, ("batch", "length", "embed"))))(model, x)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_large_replicated_parameter_fails_the_check():
    mesh = make_mesh(1, 8, 1)
    rules = tuple((k, None if k in ("embed", "mlp") else v) for k, v in RULES)
    with pytest.raises(ValueError, match="replicated on every device.*up.kernel"):
        create_sharded(lambda: MLP(512, 2048, rngs=nnx.Rngs(0)), mesh, rules,
                                replicated_min_size=512 * 1024)
    # Also when its spec names only a mesh axis of size 1: P(None, 'tensor') at tensor=1.
    only_tensor = tuple((k, None if k == "embed" else v) for k, v in RULES)
    with pytest.raises(ValueError, match="replicated on every device.*up.kernel"):
        create_sharded(lambda: MLP(512, 2048, rngs=nnx.Rngs(0)), mesh, only_tensor,
                                replicated_min_size=512 * 1024)
    model = create_sharded(lambda: MLP(512, 2048, rngs=nnx.Rngs(0)), mesh, rules,
                                    check_replicated=False)
    assert model.up.kernel[...].sharding.is_fully_replicated


def test_parameter_dimension_not_divisible_fails_naming_parameter_and_axis():
    # Before: 12 rows of `embed` over fsdp=8 were silently replicated (only fully replicated
    # parameters of 4M+ elements failed).
    mesh = make_mesh(1, 8, 1)
    make = lambda: MLP(12, 16, rngs=nnx.Rngs(0))  # noqa: E731
    with pytest.raises(ValueError, match=r"up\.kernel \(12, 16\): dimension 0 \('embed', 12\) "
                                          r"over mesh axes \('fsdp',\) of size 8.*"
                                          r"mesh\.check_replicated=False"):
        create_sharded(make, mesh, RULES)
    model = create_sharded(make, mesh, RULES, check_replicated=False)
    assert model.up.kernel[...].sharding.spec == P(None, "tensor")


def _batch_sharding(devices, **sizes):
    config = common.get_config()
    config.mesh.update(sizes)
    mesh = mesh_lib.build_mesh(config.mesh, devices)
    return jax.sharding.NamedSharding(mesh, sharding.logical_to_mesh_spec(("batch",), RULES))


def test_hosts_own_distinct_batch_rows_only_when_tensor_stays_within_a_host():
    # libtpu's v5p 4x4x4: 16 hosts of 2x2x1 chips, each device with its process_index.
    devices = aot_compile.topology_devices("v5p:4x4x4")
    assert len({d.process_index for d in devices}) == 16
    within = _batch_sharding(devices, data=-1, fsdp=8, tensor=2)
    rows = sharding.batch_rows_by_process(within, 2048)
    assert sorted(rows) == list(range(16)) and all(len(r) == 128 for r in rows.values())
    assert set().union(*rows.values()) == set(range(2048))
    sharding.check_batch_rows_per_process(within, 2048)
    # tensor=8 spans two hosts; so does tensor=4, as many chips as a host has: the mesh lays it
    # along the physical 4-chip x ring, which two hosts share.
    for sizes, axis in [(dict(tensor=8), "tensor"), (dict(tensor=4), "tensor"),
                        (dict(context=4), "context")]:
        spanning = _batch_sharding(devices, data=-1, **sizes)
        assert any(len(r) != 128 for r in sharding.batch_rows_by_process(spanning, 2048).values())
        with pytest.raises(ValueError, match=rf"16 equal shares.*mesh axes \['{axis}'\].*"
                                             r"span processes.*lower mesh\.tensor / mesh\.context"):
            sharding.check_batch_rows_per_process(spanning, 2048)


def test_compile_refuses_a_mesh_whose_hosts_would_share_batch_rows():
    config = demo_shapes.get_config()
    config.text.llms.smollm2.width = 576
    config.mesh.data, config.mesh.tensor = -1, 8
    config.model.heads, config.train.batch_size = 8, 64
    with pytest.raises(ValueError, match=r"mesh axes \['tensor'\].*span processes"):
        aot_compile.compile_train_step(config, aot_compile.topology_devices("v5p:4x4x4"))


def _shipped_configs():
    """(name, config, devices): each shipped config on the devices it is meant for."""
    cpu = jax.devices()
    yield "demo_shapes", demo_shapes.get_config(), cpu
    yield "ablations", ablation_base.get_config(), cpu
    for name, config in [("lidit_1b", lidit_1b.get_config()),
                         ("lidit_1b:offline", lidit_1b.get_config("offline")),
                         ("lidit_10b", lidit_10b.get_config()),
                         ("lidit_10b:1024", lidit_10b.get_config("1024"))]:
        yield name, config, aot_compile.topology_devices(config.aot.topology)


def test_every_shipped_config_builds_its_abstract_state_and_batch_on_its_mesh():
    # The strict checks (no undivided parameter dimension, no large replicated parameter, each
    # host its own batch rows) pass for every config we ship, on its topology.
    for name, config, devices in _shipped_configs():
        assert config.mesh.check_replicated, name
        mesh = mesh_lib.build_mesh(config.mesh, devices)
        widths = configuration.llm_widths_from_config(config)
        _, state = abstract_train_state(
            lambda c=config, w=widths: LIDiT(c, w, c.vae.latent_channels, rngs=nnx.Rngs(0)),
            config, mesh)
        assert state.params, name
        batch = jax.sharding.NamedSharding(
            mesh, sharding.logical_to_mesh_spec(("batch",), config.mesh.rules))
        sharding.check_batch_rows_per_process(batch, config.train.batch_size)


def test_constrain_is_noop_outside_mesh():
    x = jnp.ones((2, 3))
    assert sharding.constrain(x, ("batch", "embed")) is x

"""Mesh construction from config.mesh on the 8 fake CPU devices."""
import jax
import pytest

from configs import common
from lidit_jax.parallel import mesh as mesh_lib


@pytest.mark.parametrize("sizes,expected", [
    ((-1, 1, 1), (8, 1, 1, 1)),
    ((1, -1, 1), (1, 8, 1, 1)),
    ((2, -1, 2), (2, 2, 1, 2)),
    ((1, 4, 2), (1, 4, 1, 2)),
])
def test_build_mesh_shapes(sizes, expected):
    config = common.get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
    mesh = mesh_lib.build_mesh(config.mesh)
    assert tuple(mesh.shape[a] for a in mesh_lib.MESH_AXES) == expected
    assert set(mesh.devices.flat) == set(jax.devices())


def test_hybrid_mesh_puts_dcn_axis_across_slices():
    # Two 2x2 TPU v5e slices from libtpu's topology description: real slice_index per device.
    from jax.experimental import topologies
    topology = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2",
                                            chips_per_host_bounds=(2, 2, 1), num_slices=2)
    config = common.get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.dcn_data = 1, -1, 1, 2
    mesh = mesh_lib.build_mesh(config.mesh, devices=topology.devices)
    assert tuple(mesh.shape.values()) == (2, 4, 1, 1)
    # Each data row is one slice: FSDP traffic stays on ICI, only data parallelism crosses DCN.
    for row in range(2):
        assert {d.slice_index for d in mesh.devices[row].flat} == {row}


@pytest.mark.parametrize("sizes,message", [
    ((-1, -1, 1), "at most one axis may be -1"),
    ((3, -1, 1), "cannot be split"),
    ((2, 2, 1), "multiply to 4 but there are 8 devices"),
    ((0, 8, 1), "must be >= 1 or -1"),
])
def test_bad_mesh_sizes(sizes, message):
    config = common.get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
    with pytest.raises(ValueError, match=message):
        mesh_lib.build_mesh(config.mesh)

"""Mesh construction from config.mesh: on the 8 fake CPU devices and on libtpu's topologies."""
import importlib
import math
import random

import jax
import pytest

from configs import common
from lidit_jax import aot_compile, configuration
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


def test_cpu_mesh_keeps_device_order_also_with_dcn_axes():
    # No torus off TPU: the mesh is the device list reshaped, DCN parts folded into their axes.
    config = common.get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.dcn_data = 1, -1, 2
    mesh = mesh_lib.build_mesh(config.mesh)
    assert tuple(mesh.shape.values()) == (2, 4, 1, 1)
    assert list(mesh.devices.flat) == jax.devices()


# Every shipped config on the TPU topologies its docstrings, docs/launch.md and launch/*.sh name:
# (config, argument, topology (None: the config's aot.topology), slices; launchers set dcn_data).
SHIPPED_LAYOUTS = [
    ("lidit_1b", None, None, 1),  # v5p:4x4x4, data 2 x fsdp 32.
    ("lidit_1b", None, None, 2),  # docs/launch.md: launch/xpk.sh --type=v5p-128 --num-slices=2.
    ("lidit_1b", None, "v6e:8x8", 1),  # docs/launch.md: LI-DiT-1B on v6e 8x8.
    ("lidit_1b", None, "v6e:16x16", 2),  # docs/launch.md: launch/tpu_vm.sh --type=v6e-256 --node-count=2.
    ("lidit_1b", None, "v6e:16x16", 4),  # tests/test_launchers.py: xpk v6e-256, 4 slices.
    ("lidit_10b", None, None, 1),  # v5p:8x8x8, data 8 x fsdp 64.
    ("lidit_10b", None, None, 4),  # configs/lidit_10b.py: v5p-1024, --config.mesh.dcn_data=4.
    ("lidit_10b", "1024", None, 1),
    ("lidit_10b", None, "v6e:16x16", 1),  # docs/launch.md: LI-DiT-10B on v6e 16x16, data 4 x fsdp 64.
    ("lidit_10b", None, "v6e:16x16", 2),
    ("lidit_10b", "1024", "v6e:16x16", 1),
]


def _slice(device):
    return getattr(device, "slice_index", 0)  # libtpu's one-slice topology devices have none.


def _is_box(coords):
    """Whether chip coordinates fill a box: along each dimension a run of neighbouring chips."""
    spans = [sorted({c[dim] for c in coords}) for dim in range(3)]
    runs = all(span == list(range(span[0], span[-1] + 1)) for span in spans)
    return runs and len(set(coords)) == len(coords) == math.prod(len(s) for s in spans)


@pytest.mark.parametrize("name,arg,topology,num_slices", SHIPPED_LAYOUTS)
def test_shipped_configs_put_each_fsdp_group_on_a_box_of_one_slice(name, arg, topology,
                                                                    num_slices):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    config.mesh.dcn_data = num_slices
    devices = aot_compile.topology_devices(topology or config.aot.topology, num_slices)
    # Shuffled: on a pod jax.devices() follows process ids, which nothing ties to the torus, so
    # the layout must come from each chip's coordinates (libtpu's list happens to be in order).
    devices = random.Random(0).sample(devices, len(devices))
    mesh = mesh_lib.build_mesh(config.mesh, devices)

    assert dict(mesh.shape) == configuration.mesh_axis_sizes(config, len(devices))
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    # [data, context, tensor, fsdp]: one FSDP group per row.
    groups = mesh.devices.transpose(0, 2, 3, 1).reshape(-1, mesh.shape["fsdp"])
    for group in groups:
        assert len({_slice(d) for d in group}) == 1, "an FSDP group crosses DCN"
        assert _is_box([tuple(d.coords) for d in group]), [tuple(d.coords) for d in group]
    # The data axis runs over the slices: block s of its rows is slice s.
    rows_per_slice = mesh.shape["data"] // num_slices
    for row in range(mesh.shape["data"]):
        assert {_slice(d) for d in mesh.devices[row].flat} == {row // rows_per_slice}


def test_tpu_chips_of_several_slices_need_the_dcn_axis():
    # Two slices' chips share coordinates, so with dcn_data=1 no layout exists; the old code fell
    # back to list order and left to chance which axis crossed DCN.
    config = common.get_config()
    with pytest.raises(ValueError, match=r"in 2 slice\(s\) .*--config.mesh.dcn_data=2"):
        mesh_lib.build_mesh(config.mesh, aot_compile.topology_devices("v5e:2x2", num_slices=2))


def test_tpu_chips_with_no_physical_layout_are_an_error_naming_the_axes():
    # Four chips of a 2x2x2 slice that touch only at corners: no box, so no layout exists.
    corners = [d for d in aot_compile.topology_devices("v5p:2x2x2") if sum(d.coords) % 2 == 0]
    config = common.get_config()
    config.mesh.data, config.mesh.fsdp = 2, 2
    with pytest.raises(ValueError, match="no physical layout of data=2, fsdp=2, context=1, "
                                         "tensor=1 on each of 1 slice"):
        mesh_lib.build_mesh(config.mesh, corners)


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

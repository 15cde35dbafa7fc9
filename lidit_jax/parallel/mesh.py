"""Builds the device mesh from `config.mesh`; starts multi-process JAX. The only place for both."""
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils

# `context` (sequence parallelism, lidit_jax.parallel.context) sits next to `tensor`, the
# innermost axis: both exchange activations inside every layer, so they get the nearest chips.
MESH_AXES = ("data", "fsdp", "context", "tensor")

def _is_multiprocess_environment():
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # Multi-host TPU VM slice.


def initialize_distributed():
    """Calls `jax.distributed.initialize()` when the environment says this is one of many processes.

    Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (also what the tests with
    two local processes use). Otherwise JAX's own cluster detection (TPU pods, SLURM) fills them in.
    Returns whether it initialised.
    """
    if not _is_multiprocess_environment():
        return False
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def resolve_axis_sizes(sizes, num_devices, what="mesh"):
    """Replaces a single -1 in `sizes` (dict axis -> int) so the product equals num_devices."""
    unknown = [name for name, size in sizes.items() if size == -1]
    bad = {name: size for name, size in sizes.items() if size != -1 and size < 1}
    if bad:
        raise ValueError(f"{what}: axis sizes must be >= 1 or -1, got {bad}")
    if len(unknown) > 1:
        raise ValueError(f"{what}: at most one axis may be -1, got {unknown}")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"{what}: {num_devices} devices cannot be split with fixed axes {sizes} "
                f"(product {known} does not divide {num_devices})")
        sizes = dict(sizes, **{unknown[0]: num_devices // known})
    product = int(np.prod(list(sizes.values())))
    if product != num_devices:
        raise ValueError(
            f"{what}: axis sizes {sizes} multiply to {product} but there are {num_devices} "
            f"devices; set the sizes so the product is {num_devices} or make one of them -1")
    return sizes


def local_mesh():
    """All of this process's devices on the `fsdp` axis (the other axes of size 1).

    For the frozen prompt encoders: their weights (and batches) shard over the host's chips, so
    an 8B LLM in bf16 fits eight 16 GiB chips where it would not fit one, while each process
    still encodes its own captions with no collective across hosts.
    """
    return _named_mesh(np.asarray(jax.local_devices()).reshape(1, -1, 1, 1))


def _named_mesh(device_array):
    """A MESH_AXES mesh; axes are Auto so Flax NNX can shard inside jit."""
    return jax.sharding.Mesh(device_array, MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def build_mesh(mesh_config, devices=None):
    """The ('data', 'fsdp', 'context', 'tensor') mesh described by `config.mesh`.

    With `dcn_data` or `dcn_fsdp` > 1 (multi-slice), the per-slice sizes come from the ICI part
    and the mesh is built by `create_hybrid_device_mesh`, so slower DCN links carry only the
    data-parallel and FSDP traffic across slices.
    """
    devices = jax.devices() if devices is None else list(devices)
    dcn = {"data": mesh_config.dcn_data, "fsdp": mesh_config.dcn_fsdp, "context": 1, "tensor": 1}
    num_slices = dcn["data"] * dcn["fsdp"]
    if len(devices) % num_slices:
        raise ValueError(f"mesh: {len(devices)} devices do not split into dcn_data * dcn_fsdp = "
                         f"{num_slices} slices")
    ici = resolve_axis_sizes({axis: mesh_config[axis] for axis in MESH_AXES},
                             len(devices) // num_slices, "mesh (per slice)")
    ici_shape = [ici[axis] for axis in MESH_AXES]
    if num_slices > 1:
        device_array = mesh_utils.create_hybrid_device_mesh(
            ici_shape, [dcn[axis] for axis in MESH_AXES], devices)
    else:
        try:
            device_array = mesh_utils.create_device_mesh(ici_shape, devices)
        except (NotImplementedError, AssertionError, ValueError):
            # Topologies mesh_utils has no physical layout for (e.g. CPU): plain order is fine.
            device_array = np.asarray(devices).reshape(ici_shape)
    return _named_mesh(device_array)

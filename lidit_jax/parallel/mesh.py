"""Builds the device mesh from `config.mesh`; starts multi-process JAX. The only place for both."""
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils

# `context` (sequence parallelism, lidit_jax.nn.context_parallel) sits next to `tensor`, the
# innermost axis: both exchange activations inside every layer, so they get the nearest chips.
MESH_AXES = ("data", "fsdp", "context", "tensor")

DISTRIBUTED_SETTINGS = ("auto", "on", "off")


def detect_cluster():
    """(how, process count) that `jax.distributed.initialize()` would use here, or (None, 1).

    JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES, JAX_PROCESS_ID) is the explicit way; else
    JAX's own cluster detection decides, the one `jax.distributed.initialize()` runs: a Cloud TPU
    VM slice (the GCE metadata server's worker list, also multislice through
    MEGASCALE_NUM_SLICES), GKE TPU pods (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES), SLURM
    (SLURM_NTASKS tasks), Open MPI, Kubernetes. A private JAX module, so the decision is exactly
    JAX's and new cluster types are picked up with no change here.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS", int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None
    from jax._src import clusters  # Importing it registers every ClusterEnv subclass.
    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.name or env.__name__, env.get_process_count()
    return None, 1


def initialize_distributed(setting="auto", heartbeat_s=100):
    """Starts JAX's multi-controller runtime when this is one process of several; logs the layout.

    setting (config.distributed): auto: initialise when `detect_cluster` finds more than one
    process; on: initialise, and fail when no cluster is found; off: never (one process).
    heartbeat_s (config.distributed_heartbeat_s): how long the coordination service waits for a
    silent process before every other one exits non-zero (JAX's heartbeat_timeout_seconds).
    Call it once per process before anything touches a device (lidit_jax.main does, for every
    mode). Returns whether it initialised.
    """
    if setting not in DISTRIBUTED_SETTINGS:
        raise ValueError(f"distributed={setting!r}; choose one of {DISTRIBUTED_SETTINGS} "
                         "(--config.distributed=auto)")
    if heartbeat_s < 1:
        raise ValueError(f"distributed_heartbeat_s={heartbeat_s}: must be >= 1 second "
                         "(--config.distributed_heartbeat_s=100 is JAX's default)")
    how, count = (None, 1) if setting == "off" else detect_cluster()
    if setting == "on" and how is None:
        raise RuntimeError(
            "distributed=on but no cluster was detected: set JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID, run under SLURM/MPI/a TPU slice, or use "
            "--config.distributed=auto")
    started = how is not None and (setting == "on" or count is None or count > 1)
    if started:
        logging.info("starting jax.distributed (%s, %s processes)", how, count or "?")
        if how == "JAX_COORDINATOR_ADDRESS":  # JAX reads only the address from the environment.
            jax.distributed.initialize(num_processes=count,
                                       process_id=int(os.environ["JAX_PROCESS_ID"]),
                                       heartbeat_timeout_seconds=heartbeat_s)
        else:  # JAX detects the same cluster again and fills in the rest.
            jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_s)
    logging.info("process %d of %d, %d local devices, %d global devices (%s)",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].device_kind)
    return started


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

    Each axis is the ICI part (`mesh.data`, ...) times its DCN part (`mesh.dcn_data`,
    `mesh.dcn_fsdp`; 1 for context and tensor): slice s holds block s of the DCN axes, so the
    slower links between slices carry only data-parallel (and dcn_fsdp) traffic.

    On TPU each slice gets a physical layout from the chips' coordinates (`_tpu_slice_layout`),
    never the devices' list order, which on a pod follows process ids, not the torus. Other
    platforms have no torus: devices in id order (on GPU XLA's global numbering, as mesh_utils).
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
    dcn_shape = [dcn[axis] for axis in MESH_AXES]
    if devices[0].platform != "tpu":
        device_array = np.asarray(sorted(devices, key=lambda d: d.id))
        return _named_mesh(device_array.reshape(np.multiply(ici_shape, dcn_shape)))
    return _named_mesh(_tpu_slice_layout(ici, dcn_shape, devices))


def _tpu_slice_layout(ici, dcn_shape, devices):
    """TPU devices as the mesh array: per slice, each axis on whole or split torus axes.

    mesh_utils serves the most communication-heavy axis first (tensor, context, fsdp, then data)
    with physical axes whose sizes multiply to its size, so each tensor, context and FSDP group
    is a box of neighbouring chips. `allow_split_physical_axes` lets it cut one physical axis in
    two, the heavier logical axis on the minor (contiguous) part: LI-DiT-1B's fsdp 32 is no
    product of whole axes of a 4x4x4 slice (it gets 4x4x2, data the other factor 2), and without
    the split mesh_utils raises. List order is no fallback (it is not the torus on a pod), so a
    slice with no layout is an error. docs/pods.md lists the layout of each shipped config.
    """
    sizes = ", ".join(f"{axis}={size}" for axis, size in ici.items())
    # libtpu's one-slice topology devices have no slice_index.
    slices = {getattr(d, "slice_index", 0) for d in devices}
    num_slices = int(np.prod(dcn_shape))
    if len(slices) != num_slices:
        raise ValueError(
            f"mesh: the {len(devices)} TPU chips are in {len(slices)} slice(s) but "
            f"mesh.dcn_data * mesh.dcn_fsdp = {num_slices}; set --config.mesh.dcn_data="
            f"{len(slices)} (launch/tpu_vm.sh and launch/xpk.sh add it for several slices)")
    ici_shape = list(ici.values())
    try:
        if num_slices == 1:
            return mesh_utils.create_device_mesh(ici_shape, devices,
                                                 allow_split_physical_axes=True)
        return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                    allow_split_physical_axes=True)
    except (NotImplementedError, AssertionError, ValueError) as e:
        raise ValueError(
            f"mesh: no physical layout of {sizes} on each of {num_slices} slice(s) of "
            f"{len(devices) // num_slices} TPU chips ({devices[0].device_kind}); give build_mesh "
            f"whole slices (all of jax.devices()), each a box of chips. mesh_utils: {e}") from e

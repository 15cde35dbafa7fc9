"""`--mode=compile`: compile the train step for a TPU topology on any host, through libtpu.

The mesh is built from the topology's devices (no TPU needed), the train state and a batch are
abstract (jax.ShapeDtypeStruct with shardings), and XLA's TPU compiler reports the real per-chip
memory and its cost estimate. This is how the big configs are shown to fit before a pod is rented.

  python -m lidit_jax.main --config=configs/lidit_1b.py --mode=compile \\
      --config.aot.topology=v5p:4x4x4
"""
import jax
from flax import nnx

from lidit_jax import configuration
from lidit_jax.diffusion.dit import LIDiT
from lidit_jax.diffusion.objectives import make_objective
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.parallel import sharding
from lidit_jax.text.features import pools_layers
from lidit_jax.train.inputs import abstract_batch
from lidit_jax.train.state import abstract_train_state, shardings_of
from lidit_jax.train.step import jit_train_step, make_train_step

NEEDS_WORKDIR = False

# High-bandwidth memory per chip, by jax device_kind prefix.
HBM_BYTES_PER_CHIP = {
    "TPU v4": 32 << 30,
    "TPU v5 lite": 16 << 30,
    "TPU v5p": 95 << 30,
    "TPU v5": 95 << 30,
    "TPU v6 lite": 32 << 30,
}


def topology_devices(topology_name, num_slices=1):
    """The devices of a TPU topology such as 'v5p:4x4x4', described by libtpu (no TPU needed)."""
    from jax.experimental import topologies
    # One host drives up to 4 chips, 2 x 2 x 1 (libtpu wants 3 bounds for 2-D topologies too).
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=topology_name, chips_per_host_bounds=(2, 2, 1),
        num_slices=num_slices)
    return topology.devices


def compile_train_step(config, devices):
    """Lowers and compiles one train step on a mesh of `devices`; returns the compiled object."""
    pooling = [n for n in configuration.encoder_names(config) if pools_layers(config.text, n)]
    if pooling:
        raise configuration.ConfigError(
            f"text.llms.{pooling[0]}.layer='attention_pool': compiling without weights needs "
            "the encoder's number of hidden states; not supported (use --mode=describe)")
    configuration.validate(config, num_devices=len(devices))
    mesh = mesh_lib.build_mesh(config.mesh, devices)
    llm_widths = configuration.llm_widths_from_config(config)
    constructor = lambda: LIDiT(config, llm_widths, config.vae.latent_channels,  # noqa: E731
                                rngs=nnx.Rngs(config.seed))
    graphdef, state = abstract_train_state(constructor, config, mesh)
    side = config.data.image_size // config.vae.downsample
    batch = abstract_batch(config, mesh, [(w,) for w in llm_widths], config.vae.latent_channels, (side, side))
    step = make_train_step(graphdef, config, make_objective(config.diffusion))
    jitted = jit_train_step(step, shardings_of(state), shardings_of(batch), mesh)
    with jax.set_mesh(mesh), sharding.axis_rules(config.mesh.rules):
        return jitted.lower(state, batch).compile()


def memory_report(compiled, device_kind):
    """Per-chip bytes the compiled step needs, and whether they fit the chip's HBM."""
    stats = compiled.memory_analysis()
    per_chip = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                + stats.temp_size_in_bytes - stats.alias_size_in_bytes
                + stats.generated_code_size_in_bytes)
    capacity = next((v for k, v in HBM_BYTES_PER_CHIP.items() if device_kind.startswith(k)), None)
    return {
        "per_chip_bytes": per_chip,
        "arguments_bytes": stats.argument_size_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
        "hbm_bytes": capacity,
        "fits": None if capacity is None else per_chip <= capacity,
    }


def run(config, workdir):
    del workdir
    devices = topology_devices(config.aot.topology, config.aot.num_slices)
    compiled = compile_train_step(config, devices)
    memory = memory_report(compiled, devices[0].device_kind)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    print(f"topology={config.aot.topology} slices={config.aot.num_slices} chips={len(devices)} "
          f"kind={devices[0].device_kind}")
    gib = 1 << 30
    print(f"per_chip_memory_gib={memory['per_chip_bytes'] / gib:.2f} "
          f"(arguments {memory['arguments_bytes'] / gib:.2f}, temporaries "
          f"{memory['temp_bytes'] / gib:.2f}) hbm_gib="
          f"{memory['hbm_bytes'] / gib if memory['hbm_bytes'] else float('nan'):.1f}")
    # libtpu reports a negative optimal_seconds when its cost model has no estimate.
    seconds = cost.get("optimal_seconds", -1.0)
    print(f"step_flops_per_chip={cost.get('flops', float('nan')):.4g} "
          f"optimal_seconds={seconds if seconds >= 0 else float('nan'):.4g}")
    print(f"fits={memory['fits']}")

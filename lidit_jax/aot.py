"""`--mode=compile`: compile the train step for a TPU topology on any host, through libtpu.

The mesh is built from the topology's devices (no TPU needed), the train state and a batch are
abstract (jax.ShapeDtypeStruct with shardings), and XLA's TPU compiler reports the real per-chip
memory and its cost estimate. This is how the big configs are shown to fit before a pod is rented.

  python -m lidit_jax.main --config=configs/lidit_1b.py --mode=compile \\
      --config.aot.topology=v5p:4x4x4

The report (`step_report`): per-chip memory split into parameters, optimizer moments, EMA,
activations and temporaries (the compiled step's own numbers); the step's FLOPs with loops
counted, checked against `diffusion.flops.train_step_flops`; the estimated step time; and the
implied MFU against the chip's bf16 peak. XLA's cost analysis counts a while loop's body once,
so with `model.scan_layers` the scanned 28 blocks of LI-DiT-1B count as one (7.7e12 instead of
4.2e13 FLOPs per chip on v5p 4x4x4). The loop-counted numbers come from two unrolled twins of
the step, with 1 and 2 blocks and one micro-batch: every block is identical, so
cost(depth D) = cost(1) + (D - 1) (cost(2) - cost(1)), times the micro-batches. Two small
compiles instead of one unrolled 28-block compile (4 minutes on 2 cores for LI-DiT-1B).
Last line: `fits=<True|False> hbm_per_chip_gib=<float> est_mfu=<float>`.
"""
import copy
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lidit_jax import configuration
from lidit_jax.diffusion import flops as flops_lib
from lidit_jax.diffusion.dit import LIDiT
from lidit_jax.diffusion.objectives import make_objective
from lidit_jax.nn.attention import select_implementation, splash_tiles
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
# Dense bf16 matmul peak per chip (FLOP/s), by the same prefixes: Google Cloud's TPU pages.
BF16_PEAK_FLOPS_PER_CHIP = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}
# Systolic array width of the chip's MXUs: a matmul axis shorter than it still takes a full pass.
MXU_WIDTH = {"TPU v4": 128, "TPU v5 lite": 128, "TPU v5p": 128, "TPU v5": 128, "TPU v6 lite": 256}
# Matmuls of one splash attention call, forward and backward (`splash_cost_per_chip`;
# tests/test_aot.py counts them in the kernel's interpret-mode lowering).
SPLASH_FORWARD_MATMULS = 2
SPLASH_BACKWARD_MATMULS = 7
# Model FLOPs (train_step_flops) and the compiler's may differ by this much before the report
# explains why: remat recomputation, element-wise work and attention padding.
FLOPS_TOLERANCE = 0.10


def _by_kind(table, device_kind):
    return next((v for k, v in table.items() if device_kind.startswith(k)), None)


def topology_devices(topology_name, num_slices=1):
    """The devices of a TPU topology such as 'v5p:4x4x4', described by libtpu (no TPU needed)."""
    from jax.experimental import topologies
    # One host drives up to 4 chips, 2 x 2 x 1 (libtpu wants 3 bounds for 2-D topologies too).
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=topology_name, chips_per_host_bounds=(2, 2, 1),
        num_slices=num_slices)
    return topology.devices


def compile_train_step(config, devices):
    """Lowers and compiles one train step on a mesh of `devices`: (compiled, abstract state)."""
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
    batch = abstract_batch(config, mesh, [(w,) for w in llm_widths], config.vae.latent_channels,
                           (side, side))
    # The topology's devices carry their hosts: a mesh the trainer could not feed fails here too.
    sharding.check_batch_rows_per_process(batch["x0"].sharding, config.train.batch_size)
    step = make_train_step(graphdef, config, make_objective(config.diffusion))
    jitted = jit_train_step(step, shardings_of(state), shardings_of(batch), mesh)
    with jax.set_mesh(mesh), sharding.axis_rules(config.mesh.rules):
        return jitted.lower(state, batch).compile(), state


def memory_report(compiled, device_kind):
    """Per-chip bytes the compiled step needs, and whether they fit the chip's HBM."""
    stats = compiled.memory_analysis()
    per_chip = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                + stats.temp_size_in_bytes - stats.alias_size_in_bytes
                + stats.generated_code_size_in_bytes)
    capacity = _by_kind(HBM_BYTES_PER_CHIP, device_kind)
    return {
        "per_chip_bytes": per_chip,
        "arguments_bytes": stats.argument_size_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
        "hbm_bytes": capacity,
        "fits": None if capacity is None else per_chip <= capacity,
    }


def state_bytes_per_chip(state):
    """Per-chip bytes of each TrainState field (params, opt_state, ema_params, ...), from the
    abstract state's shapes and shardings (the largest shard, as the fullest chip holds it)."""
    out = {}
    for field in ("params", "opt_state", "ema_params"):
        total = 0
        for leaf in jax.tree.leaves(getattr(state, field)):
            sharded = leaf.sharding is not None
            shape = leaf.sharding.shard_shape(leaf.shape) if sharded else leaf.shape
            total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
        out[field] = total
    return out


def _cost(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # libtpu reports a negative optimal_seconds when its cost model has no estimate.
    seconds = cost.get("optimal_seconds", -1.0)
    return cost.get("flops", float("nan")), seconds if seconds >= 0 else float("nan")


def loop_counted_cost(config, devices, compiled=None):
    """(FLOPs per chip, estimated seconds) of one step with every loop counted.

    Without scanned layers or micro-batches `compiled` (the step's own executable) is already
    loop-free; otherwise, or with compiled=None, from two unrolled twins (depth 1 and 2, one
    micro-batch of the same per-micro-batch size): the speed without compiling the full step.
    """
    micro = config.train.microbatches
    if compiled is not None and not config.model.scan_layers and micro == 1:
        return _cost(compiled)
    costs = []
    for depth in (1, 2):
        twin = copy.deepcopy(config)
        twin.model.depth, twin.model.scan_layers = depth, False
        twin.train.batch_size, twin.train.microbatches = config.train.batch_size // micro, 1
        costs.append(_cost(compile_train_step(twin, devices)[0]))
    (f1, s1), (f2, s2) = costs
    depth = config.model.depth
    # The optimizer update runs once per step, not per micro-batch: its cost (O(params)
    # element-wise, < 0.1 % of a step) is counted `micro` times here.
    return micro * (f1 + (depth - 1) * (f2 - f1)), micro * (s1 + (depth - 1) * (s2 - s1))


def step_report(config, devices, compiled, state):
    """Everything `--mode=compile` prints, as a dict (bytes, FLOPs and seconds per chip)."""
    memory = memory_report(compiled, devices[0].device_kind)
    memory.update(state_bytes_per_chip(state))
    return dict(memory, **speed_report(config, devices, compiled))


def dit_attention_kernels(config, device):
    """[(kernel, q_len, kv_len)] of the DiT's self-attention and cross-attention on `device`:
    what `model.attention` resolves to for the config's image tokens and text tokens (all
    branches, as `diffusion.flops` counts them)."""
    m = config.model
    tokens = (config.data.image_size // config.vae.downsample // m.patch_size) ** 2
    text = config.text.max_length * len(configuration.llm_widths_from_config(config))
    calls = []
    for q_len, kv_len in ((tokens, tokens), (tokens, text)):
        kernel = m.attention if m.attention != "auto" else select_implementation(
            q_len, kv_len, m.width // m.heads, m.dtype, device.platform, device.device_kind)
        calls.append((kernel, q_len, kv_len))
    return calls


def splash_cost_per_chip(config, device, chips):
    """(FLOPs, seconds) per chip of the step's splash kernels, which XLA's cost model does not
    see; seconds at the roofline, the cost model's own rule for every matmul.

    A Pallas kernel reaches XLA as an opaque Mosaic custom call: no FLOPs, no time (LI-DiT-10B,
    full remat: the compiler's count is 1.26 of the model's at 512 px and 1.08 at 1024 px where
    about 4/3 is due). Counted from the kernels' matmuls instead, each 2 N_q N_kv d FLOPs over
    the tile-padded lengths (d = width, all heads): 2 forward (QK^T, PV), 7 backward (the dq
    kernel: QK^T, dO V^T, dS K; the dkv kernel: QK^T, dO V^T, P^T dO, dS^T Q), and the forward
    again under remat, for each of the DiT's attentions that runs splash on `device`. (The
    text refiners' `auto` keeps XLA: text is shorter than nn.attention.AUTO_MIN_SEQ_LEN.) The
    time is those matmuls at the chip's bf16 peak with each head padded to the MXU's width:
    every matmul of the kernel has head_dim as its contraction or output axis, so a head of 64
    on a 128-wide MXU takes as long as one of 128.
    """
    m = config.model
    head_dim, mxu = m.width // m.heads, _by_kind(MXU_WIDTH, device.device_kind)
    mxu_head_dim = -(-head_dim // mxu) * mxu
    forward = SPLASH_FORWARD_MATMULS * (1 if m.remat == "none" else 2)
    per_example = 0
    for kernel, q_len, kv_len in dit_attention_kernels(config, device):
        if kernel == "splash":
            _, (q_pad, kv_pad) = splash_tiles(q_len, kv_len, (m.splash_block_q, m.splash_block_kv))
            per_example += (forward + SPLASH_BACKWARD_MATMULS) * 2 * q_pad * kv_pad * m.width
    flops = config.train.batch_size * m.depth * per_example / chips
    peak = _by_kind(BF16_PEAK_FLOPS_PER_CHIP, device.device_kind)
    return flops, flops * mxu_head_dim / head_dim / peak


def speed_report(config, devices, compiled=None):
    """The step's loop-counted FLOPs, their check against the model count, the estimated
    seconds and MFU per chip (compiled=None: from the twins alone, see loop_counted_cost).

    Splash kernels, opaque to the cost model, are added at the roofline, the cost model's own
    rule for every matmul (`splash_cost_per_chip`).
    """
    kind = devices[0].device_kind
    flops, seconds = loop_counted_cost(config, devices, compiled)
    llm_widths = configuration.llm_widths_from_config(config)
    side = config.data.image_size // config.vae.downsample
    model_flops = flops_lib.train_step_flops(
        config, llm_widths, batch=config.train.batch_size, hw=(side, side),
        text_lengths=[config.text.max_length] * len(llm_widths),
        in_channels=config.vae.latent_channels) / len(devices)
    peak = _by_kind(BF16_PEAK_FLOPS_PER_CHIP, kind)
    splash_flops, splash_seconds = splash_cost_per_chip(config, devices[0], len(devices))
    flops, seconds = flops + splash_flops, seconds + splash_seconds
    ratio = flops / model_flops
    if splash_flops:
        why = ("splash kernels counted from their matmuls at the bf16 peak, heads padded to the "
               "MXU (the cost model cannot see them); their backward recomputes the logits")
    elif abs(ratio - 1) <= FLOPS_TOLERANCE:
        why = "ok"
    elif config.model.remat == "full" and ratio > 1:
        why = "remat=full recomputes the forward in the backward: expect about 4/3"
    else:
        why = "beyond 10 %: element-wise work, padding or recomputation the model count omits"
    mfu = model_flops / (seconds * peak) if peak and seconds == seconds else float("nan")
    return dict(kind=kind, chips=len(devices), compiler_flops=flops,
                model_flops=model_flops, flops_ratio=ratio, flops_check=why, seconds=seconds,
                peak_flops=peak, est_mfu=mfu, splash_flops=splash_flops,
                splash_seconds=splash_seconds)


def print_report(config, report):
    gib = 1 << 30
    print(f"topology={config.aot.topology} slices={config.aot.num_slices} "
          f"chips={report['chips']} kind={report['kind']}")
    hbm = report["hbm_bytes"] / gib if report["hbm_bytes"] else float("nan")
    print(f"per_chip_memory_gib={report['per_chip_bytes'] / gib:.2f} "
          f"(arguments {report['arguments_bytes'] / gib:.2f}, temporaries "
          f"{report['temp_bytes'] / gib:.2f}) hbm_gib={hbm:.1f}")
    encoders = ("0 (text states from text.cache_dir)" if config.text.cache_dir else
                "not counted (online encoding also keeps the frozen LLMs on these chips; "
                "precompute with --mode=encode)")
    print(f"memory_gib: params={report['params'] / gib:.2f} "
          f"optimizer={report['opt_state'] / gib:.2f} ema={report['ema_params'] / gib:.2f} "
          f"activations_and_temporaries={report['temp_bytes'] / gib:.2f} "
          f"resident_encoders={encoders}")
    print(f"step_flops_per_chip={report['compiler_flops']:.4g} (loops counted) "
          f"model_flops_per_chip={report['model_flops']:.4g} ratio={report['flops_ratio']:.3f} "
          f"check={report['flops_check']}")
    peak = report["peak_flops"] or float("nan")
    print(f"est_step_seconds={report['seconds']:.4g} bf16_peak_tflops_per_chip={peak / 1e12:.0f} "
          f"images_per_second={config.train.batch_size / report['seconds']:.4g}")
    if report["splash_flops"]:
        # The roofline is the cost model's rule for every op; a real kernel reaches a fraction.
        half = report["seconds"] + report["splash_seconds"]
        print(f"splash_seconds={report['splash_seconds']:.4g} (at the bf16 peak; at half of it: "
              f"est_step_seconds={half:.4g} est_mfu="
              f"{report['model_flops'] / (half * peak):.4f})")
    print(f"fits={report['fits']} hbm_per_chip_gib={report['per_chip_bytes'] / gib:.2f} "
          f"est_mfu={report['est_mfu']:.4f}")


def run(config, workdir):
    del workdir
    devices = topology_devices(config.aot.topology, config.aot.num_slices)
    compiled, state = compile_train_step(config, devices)
    print_report(config, step_report(config, devices, compiled, state))

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

With text.cache_dir empty the frozen LLMs run inside the step (text/in_step.py) and are counted:
their weights are arguments of the compiled step (in its memory), built from each LLM's
config.json or GGUF header (no weights read), and their cost comes from two small programs per
LLM, the encoder alone with 0 and 1 layers: cost(depth) = cost(0) + depth (cost(1) - cost(0)),
the layer stack being one scan whose body the cost model counts once. They print as
`encoder_flops_per_chip=<float> encoder_hbm_gib=<float>` (weights per chip plus one layer's
temporaries) before the last line, and est. MFU is for the whole step as launched:
(DiT model FLOPs + encoder FLOPs) / ((DiT seconds + encoder seconds) x peak). Token ids are
compiled at text.max_length, the longest bucket the trainer sends.
Last line: `fits=<True|False> hbm_per_chip_gib=<float> est_mfu=<float>`.
"""
import copy
import json
import math
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from lidit_jax import configuration, hardware
from lidit_jax.diffusion import flops as flops_lib
from lidit_jax.nn.attention import select_implementation, splash_tiles
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.parallel import sharding
from lidit_jax.text import architectures, features
from lidit_jax.text import weights as weights_lib
from lidit_jax.text.features import pools_layers
from lidit_jax.text.in_step import StateChoice, TextEncoders
from lidit_jax.text.llm import keep_layers
from lidit_jax.text.models import resolve_model_path
from lidit_jax.train.inputs import abstract_batch
from lidit_jax.train import program as program_lib
from lidit_jax.train.state import shardings_of

NEEDS_WORKDIR = False

# Matmuls of one splash attention call, forward and backward (`splash_cost_per_chip`;
# tests/test_aot.py counts them in the kernel's interpret-mode lowering).
SPLASH_FORWARD_MATMULS = 2
SPLASH_BACKWARD_MATMULS = 7
# Model FLOPs (train_step_flops) and the compiler's may differ by this much before the report
# explains why: remat recomputation, element-wise work and attention padding.
FLOPS_TOLERANCE = 0.10


def _chip_value(device_kind, field):
    """A field of `hardware.chip(device_kind)`, None for a chip the table lacks."""
    found = hardware.chip(device_kind)
    return None if found is None else getattr(found, field)


def topology_devices(topology_name, num_slices=1):
    """The devices of a TPU topology such as 'v5p:4x4x4', described by libtpu (no TPU needed)."""
    from jax.experimental import topologies
    # One host drives up to 4 chips, 2 x 2 x 1 (libtpu wants 3 bounds for 2-D topologies too).
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=topology_name, chips_per_host_bounds=(2, 2, 1),
        num_slices=num_slices)
    return topology.devices


def _encoder_architecture(config, name):
    """The model config (llm.LLMConfig, bert / t5) of encoder `name`: its config.json or GGUF
    header, no weights."""
    key = f"text.llms.{name}.path"
    llm = config.text.llms[name]
    if not llm.path and llm.get("architecture"):
        return architectures.model_config(llm.architecture, f"text.llms.{name}.architecture")
    if not llm.path:
        raise configuration.ConfigError(
            f"{key} is empty: compiling the online text path (text.cache_dir='') builds the "
            f"LLM from its config.json; set {key} (a folder holding config.json is enough) or "
            f"text.llms.{name}.architecture, or set text.cache_dir to compile the cached path")
    path = pathlib.Path(resolve_model_path(config.text.llms[name].path, key=key))
    if path.is_dir():  # config.json alone: the weights need not be on the compiling host.
        config_json = path / "config.json"
        return weights_lib.config_from_hf(json.loads(config_json.read_text()), name=path.name,
                                          where=str(config_json))
    return weights_lib.open_source(path).config


def abstract_text_encoders(config, mesh, depths=None):
    """(in_step.TextEncoders, [abstract weights with shardings]) of the LLMs the train step runs,
    cut to the layers their chosen states need (or to `depths`, one per LLM: cost twins)."""
    graphdefs, choices, params = [], [], []
    for k, name in enumerate(features.encoder_names(config.text)):
        llm = config.text.llms[name]
        architecture = _encoder_architecture(config, name)
        module = weights_lib.model_family(architecture)[0]
        model = nnx.eval_shape(lambda: module(architecture, jnp.dtype(llm.dtype),  # noqa: B023
                                              config.text.attention))
        graphdef, state = nnx.split(model)
        choice = StateChoice.of(features.parse(llm.layer, llm.layer_combine, f"text.llms.{name}"),
                                llm.layer_combine, llm.final_norm, architecture.num_layers)
        if depths is not None:
            choice = StateChoice(depths[k], llm.layer_combine, False, architecture.num_layers)
        state = jax.eval_shape(lambda s: keep_layers(s, choice.depth), state)  # noqa: B023
        shardings = sharding.state_shardings(state, mesh, config.mesh.rules)
        params.append(jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings))
        graphdefs.append(graphdef)
        choices.append(choice)
    return TextEncoders(tuple(graphdefs), tuple(choices)), params


def compile_train_step(config, devices):
    """Lowers and compiles one train step on a mesh of `devices`: (compiled, abstract state);
    with text.cache_dir empty, the frozen LLMs inside it."""
    pooling = [n for n in features.encoder_names(config.text) if pools_layers(config.text, n)]
    if pooling:
        raise configuration.ConfigError(
            f"text.llms.{pooling[0]}.layer='attention_pool': compiling without weights needs "
            "the encoder's number of hidden states; not supported (use --mode=describe)")
    configuration.validate(config, num_devices=len(devices))
    mesh = mesh_lib.build_mesh(config.mesh, devices)
    llm_widths = configuration.llm_widths_from_config(config)
    side = config.data.image_size // config.vae.downsample
    batch = abstract_batch(config, mesh, [(w,) for w in llm_widths], config.vae.latent_channels,
                           (side, side))
    # The topology's devices carry their hosts: a mesh the trainer could not feed fails here too.
    sharding.check_batch_rows_per_process(batch["x0"].sharding, config.train.batch_size)
    text_encoders, encoder_args = None, ()
    if not config.text.cache_dir:
        text_encoders, encoder_params = abstract_text_encoders(config, mesh)
        encoder_args = (encoder_params,)
    program = program_lib.build(config, mesh, llm_widths, config.vae.latent_channels,
                                (side, side), shardings_of(batch), text_encoders,
                                *(shardings_of(a) for a in encoder_args))
    state = program.abstract_state
    with jax.set_mesh(mesh), sharding.axis_rules(config.mesh.rules):
        return program.step.lower(state, batch, *encoder_args).compile(), state


def encoder_report(config, devices):
    """{'flops', 'seconds', 'hbm_bytes'} per chip of the frozen LLMs the step runs (text.cache_dir
    empty): loop-counted from programs of the encoders alone with 0 and 1 layers (see the module
    docstring); hbm_bytes: their weights per chip plus the 1-layer program's temporaries."""
    mesh = mesh_lib.build_mesh(config.mesh, devices)
    full, params = abstract_text_encoders(config, mesh)
    side = config.data.image_size // config.vae.downsample
    # Token ids [batch, text.max_length] per LLM (the state shapes only count the LLMs here).
    tokens = abstract_batch(config, mesh, [()] * len(params), config.vae.latent_channels,
                            (side, side))["text"]
    # The 0- and 1-layer twins of every LLM, built once.
    twins = [abstract_text_encoders(config, mesh, [depth] * len(params)) for depth in (0, 1)]
    flops = seconds = temp = 0.0
    for k, choice in enumerate(full.choices):
        costs = []
        for encoders, twin_params in twins:
            one = TextEncoders(encoders.graphdefs[k:k + 1], encoders.choices[k:k + 1])
            one_tokens = {key: value[k:k + 1] for key, value in tokens.items()}
            with jax.set_mesh(mesh), sharding.axis_rules(config.mesh.rules):
                compiled = jax.jit(one).lower(twin_params[k:k + 1], one_tokens).compile()
            costs.append(_cost(compiled))
            temp = max(temp, compiled.memory_analysis().temp_size_in_bytes)
        (f0, s0), (f1, s1) = costs
        flops += f0 + choice.depth * (f1 - f0)
        seconds += s0 + choice.depth * (s1 - s0)
    weight_bytes = sum(_bytes_per_chip(leaf) for leaf in jax.tree.leaves(params))
    return {"flops": flops, "seconds": seconds, "hbm_bytes": weight_bytes + temp}


def _bytes_per_chip(leaf):
    """Bytes of the largest shard of an abstract array (what the fullest chip holds)."""
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    return math.prod(shape) * jnp.dtype(leaf.dtype).itemsize


def memory_report(compiled, device_kind):
    """Per-chip bytes the compiled step needs, and whether they fit the chip's HBM."""
    stats = compiled.memory_analysis()
    per_chip = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                + stats.temp_size_in_bytes - stats.alias_size_in_bytes
                + stats.generated_code_size_in_bytes)
    capacity = _chip_value(device_kind, "hbm_bytes")
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
    return {field: sum(_bytes_per_chip(leaf) for leaf in jax.tree.leaves(getattr(state, field)))
            for field in ("params", "opt_state", "ema_params")}


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
    if (compiled is not None and not config.model.scan_layers and micro == 1
            and config.text.cache_dir):
        return _cost(compiled)
    costs = []
    for depth in (1, 2):
        twin = copy.deepcopy(config)
        # The twins count the DiT alone, text states as inputs as with the text cache (never
        # read while compiling); frozen LLMs in the step are counted by `encoder_report`.
        twin.text.cache_dir = twin.text.cache_dir or "compile-twin"
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
    branches, as `diffusion.flops` counts them). Ring context parallelism runs the
    self-attention's hops in XLA whatever `model.attention` says (nn/context_parallel.py)."""
    m = config.model
    tokens = (config.data.image_size // config.vae.downsample // m.patch_size) ** 2
    text = config.text.max_length * len(configuration.llm_widths_from_config(config))
    calls = []
    for q_len, kv_len in ((tokens, tokens), (tokens, text)):
        kernel = m.attention if m.attention != "auto" else select_implementation(
            q_len, kv_len, m.width // m.heads, m.dtype, device.platform, device.device_kind)
        if q_len == kv_len == tokens and config.mesh.context > 1 and m.context_parallel == "ring":
            kernel = "xla"
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
    head_dim, mxu = m.width // m.heads, _chip_value(device.device_kind, "mxu_width")
    mxu_head_dim = -(-head_dim // mxu) * mxu
    forward = SPLASH_FORWARD_MATMULS * (1 if m.remat == "none" else 2)
    per_example = 0
    for kernel, q_len, kv_len in dit_attention_kernels(config, device):
        if kernel == "splash":
            _, (q_pad, kv_pad) = splash_tiles(q_len, kv_len, (m.splash_block_q, m.splash_block_kv))
            per_example += (forward + SPLASH_BACKWARD_MATMULS) * 2 * q_pad * kv_pad * m.width
    flops = config.train.batch_size * m.depth * per_example / chips
    peak = _chip_value(device.device_kind, "bf16_peak_flops")
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
    peak = _chip_value(kind, "bf16_peak_flops")
    splash_flops, splash_seconds = splash_cost_per_chip(config, devices[0], len(devices))
    flops, seconds = flops + splash_flops, seconds + splash_seconds
    ratio = flops / model_flops
    encoders = (encoder_report(config, devices) if not config.text.cache_dir else
                {"flops": 0.0, "seconds": 0.0, "hbm_bytes": 0})
    if splash_flops:
        why = ("splash kernels counted from their matmuls at the bf16 peak, heads padded to the "
               "MXU (the cost model cannot see them); their backward recomputes the logits")
    elif abs(ratio - 1) <= FLOPS_TOLERANCE:
        why = "ok"
    elif config.model.remat == "full" and ratio > 1:
        why = "remat=full recomputes the forward in the backward: expect about 4/3"
    else:
        why = "beyond 10 %: element-wise work, padding or recomputation the model count omits"
    # The whole step as launched: the frozen LLMs' forward is work the chips do every step.
    step_flops = model_flops + encoders["flops"]
    step_seconds = seconds + encoders["seconds"]
    mfu = step_flops / (step_seconds * peak) if peak and seconds == seconds else float("nan")
    return dict(kind=kind, chips=len(devices), compiler_flops=flops,
                model_flops=model_flops, flops_ratio=ratio, flops_check=why,
                seconds=step_seconds, dit_seconds=seconds, peak_flops=peak, est_mfu=mfu,
                splash_flops=splash_flops, splash_seconds=splash_seconds,
                encoder_flops=encoders["flops"], encoder_seconds=encoders["seconds"],
                encoder_hbm_bytes=encoders["hbm_bytes"])


def print_report(config, report):
    gib = 1 << 30
    print(f"topology={config.aot.topology} slices={config.aot.num_slices} "
          f"chips={report['chips']} kind={report['kind']}")
    hbm = report["hbm_bytes"] / gib if report["hbm_bytes"] else float("nan")
    print(f"per_chip_memory_gib={report['per_chip_bytes'] / gib:.2f} "
          f"(arguments {report['arguments_bytes'] / gib:.2f}, temporaries "
          f"{report['temp_bytes'] / gib:.2f}) hbm_gib={hbm:.1f}")
    encoders = ("0 (text states from text.cache_dir)" if config.text.cache_dir else
                f"{report['encoder_hbm_bytes'] / gib:.2f} (frozen LLMs inside the step)")
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
              f"{(report['model_flops'] + report['encoder_flops']) / (half * peak):.4f})")
    if not config.text.cache_dir:
        share = report["encoder_flops"] / (report["encoder_flops"] + report["model_flops"])
        print(f"encoder_seconds={report['encoder_seconds']:.4g} (in est_step_seconds) "
              f"encoder_share_of_step_flops={share:.3f}")
        print(f"encoder_flops_per_chip={report['encoder_flops']:.4g} "
              f"encoder_hbm_gib={report['encoder_hbm_bytes'] / gib:.4f}")
    print(f"fits={report['fits']} hbm_per_chip_gib={report['per_chip_bytes'] / gib:.2f} "
          f"est_mfu={report['est_mfu']:.4f}")


def run(config, workdir):
    del workdir
    devices = topology_devices(config.aot.topology, config.aot.num_slices)
    compiled, state = compile_train_step(config, devices)
    print_report(config, step_report(config, devices, compiled, state))

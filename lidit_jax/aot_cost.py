"""What the compiled train step costs per chip (`--mode=compile`'s numbers): memory from the
compiler's own analysis; FLOPs and seconds from XLA's cost model with every loop counted
(unrolled twins, see lidit_jax/aot.py); splash kernels, which the cost model cannot see, at the
roofline; and the frozen LLMs the step runs (text.cache_dir empty).
"""
import copy
import math

import jax
import jax.numpy as jnp

from lidit_jax import configuration, hardware
from lidit_jax.aot_compile import abstract_text_encoders, compile_train_step
from lidit_jax.nn.attention import select_implementation, splash_tiles
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.parallel import sharding
from lidit_jax.text.in_step import TextEncoders
from lidit_jax.train import program as program_lib
from lidit_jax.train.inputs import abstract_batch

# Matmuls of one splash attention call, forward and backward (`splash_cost_per_chip`;
# tests/test_aot.py counts them in the kernel's interpret-mode lowering).
SPLASH_FORWARD_MATMULS = 2
SPLASH_BACKWARD_MATMULS = 7
# Model FLOPs (DiT and refiners) and the compiler's may differ by this much before the report
# explains why: remat recomputation, element-wise work and attention padding.
FLOPS_TOLERANCE = 0.10


def _chip_value(device_kind, field):
    """A field of `hardware.chip(device_kind)`, None for a chip the table lacks."""
    found = hardware.chip(device_kind)
    return None if found is None else getattr(found, field)


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


# (twin config as JSON, the devices named) -> (FLOPs, seconds): a sweep's rows of one config on
# one topology that differ only in the text path (benchmarks/tpu_estimates.py) compile their
# twins once (minutes each for LI-DiT-1B on 2 cores).
_TWIN_COSTS = {}


def _twin_cost(twin, devices):
    key = (twin.to_json_best_effort(sort_keys=True),
           tuple(f"{d.device_kind} {d!r}" for d in devices))
    if key not in _TWIN_COSTS:
        _TWIN_COSTS[key] = _cost(compile_train_step(twin, devices)[0])
    return _TWIN_COSTS[key]


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
        # read while compiling); frozen LLMs in the step are counted by `encoder_report`. So a
        # config's cached and online text paths have the same twins.
        twin.text.cache_dir = "compile-twin"
        twin.model.depth, twin.model.scan_layers = depth, False
        twin.train.batch_size, twin.train.microbatches = config.train.batch_size // micro, 1
        costs.append(_twin_cost(twin, devices))
    (f1, s1), (f2, s2) = costs
    depth = config.model.depth
    # The optimizer update runs once per step, not per micro-batch: its cost (O(params)
    # element-wise, < 0.1 % of a step) is counted `micro` times here.
    return micro * (f1 + (depth - 1) * (f2 - f1)), micro * (s1 + (depth - 1) * (s2 - s1))


def encoder_report(config, devices):
    """{'flops', 'seconds', 'hbm_bytes'} per chip of the frozen LLMs the step runs
    (text.cache_dir empty): loop-counted from programs of the encoders alone with 0 and 1
    layers (see the module docstring), over the tokens after each template's cached prefix
    (`in_step.prefix_cache`, where the LLM's tokenizer is there to find it), as the step runs
    them; hbm_bytes: their weights and prefix caches per chip plus the 1-layer program's
    temporaries."""
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
            with jax.set_mesh(mesh), sharding.axis_rules(config.mesh.rules):
                compiled = jax.jit(one).lower(twin_params[k:k + 1], tokens[k:k + 1]).compile()
            costs.append(_cost(compiled))
            temp = max(temp, compiled.memory_analysis().temp_size_in_bytes)
        (f0, s0), (f1, s1) = costs
        flops += f0 + choice.depth * (f1 - f0)
        seconds += s0 + choice.depth * (s1 - s0)
    weight_bytes = sum(_bytes_per_chip(leaf) for leaf in jax.tree.leaves(params))
    return {"flops": flops, "seconds": seconds, "hbm_bytes": weight_bytes + temp}


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


def model_flops_per_chip(config, devices):
    """(DiT and refiners, whole step) model FLOPs per chip of the step `compile_train_step`
    compiles, both from the trainer's count (`program.model_flops_per_step`); the whole step's
    includes the frozen LLMs' forward when they run in it (text.cache_dir empty). The compiler's
    loop-counted DiT FLOPs are checked against the first."""
    llm_widths = configuration.llm_widths_from_config(config)
    side = config.data.image_size // config.vae.downsample
    encoder_params = None
    if not config.text.cache_dir:  # Abstract, as the compiled step takes them.
        encoder_params = abstract_text_encoders(config, mesh_lib.build_mesh(config.mesh,
                                                                            devices))[1]
    return tuple(program_lib.model_flops_per_step(config, llm_widths, config.vae.latent_channels,
                                                  (side, side), params) / len(devices)
                 for params in (None, encoder_params))


def speed_report(config, devices, compiled=None):
    """The step's loop-counted FLOPs, their check against the model count, the estimated
    seconds and MFU per chip (compiled=None: from the twins alone, see loop_counted_cost).

    Splash kernels, opaque to the cost model, are added at the roofline, the cost model's own
    rule for every matmul (`splash_cost_per_chip`). model_flops and step_model_flops:
    `model_flops_per_chip` (the DiT's and refiners', the whole step's as the trainer counts it).
    """
    kind = devices[0].device_kind
    flops, seconds = loop_counted_cost(config, devices, compiled)
    model_flops, step_model_flops = model_flops_per_chip(config, devices)
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
                step_model_flops=step_model_flops,
                encoder_flops=encoders["flops"], encoder_model_flops=step_model_flops - model_flops,
                encoder_seconds=encoders["seconds"],
                encoder_hbm_bytes=encoders["hbm_bytes"])

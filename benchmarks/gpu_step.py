"""LI-DiT-1B train step on one NVIDIA GPU (H100 / H200): cuDNN vs XLA attention, bf16, 256 px.

    python benchmarks/gpu_step.py                 # both kernels, batch 32, ~3 min on an H100
    python benchmarks/gpu_step.py --smoke         # tiny shapes on any host (CPU): keeps it alive

The whole train step of `configs/lidit_1b.py` (DiT depth 28, width 1152, token and
collaborative refiners over two 4096-wide LLM branches of 256 cached tokens, AdamW, EMA) on
random 32x32x16 latents and random text states: what one GPU of a data-parallel run does. For
each attention kernel: compile, 2 warm-up steps, then `--steps` timed steps; prints step time,
images/s and MFU (model FLOPs of `diffusion.flops.train_step_flops` / time / the chip's dense
bf16 peak). Nothing is downloaded; no weights are needed.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import lidit_1b  # noqa: E402
from lidit_jax import configuration, hardware  # noqa: E402
from lidit_jax.parallel import mesh as mesh_lib  # noqa: E402
from lidit_jax.parallel import sharding  # noqa: E402
from lidit_jax.train import program as program_lib  # noqa: E402
from lidit_jax.train.inputs import abstract_batch, random_batch  # noqa: E402
from lidit_jax.train.state import shardings_of  # noqa: E402


def step_config(args):
    config = lidit_1b.get_config()
    config.mesh.data, config.mesh.fsdp = 1, 1
    config.train.batch_size = args.batch
    config.model.remat = args.remat
    config.text.cache_dir = "unread"  # Cached text states in the batch: the DiT's step alone.
    if args.smoke:
        config.model.update(depth=2, width=64, heads=2)
        config.text.refiner.heads = config.text.collaborative.heads = 2
        config.text.max_length = 16
        config.text.llms.llama3.width = config.text.llms.qwen.width = 32
        config.data.image_size = 64
    return config


def measure(config, attention, steps):
    """Seconds per train step (median of `steps`) with model.attention = `attention`."""
    config.model.attention = attention
    llm_widths = configuration.llm_widths_from_config(config)
    mesh = mesh_lib.build_mesh(config.mesh, jax.devices()[:1])
    side = config.data.image_size // config.vae.downsample
    abstract = abstract_batch(config, mesh, [(w,) for w in llm_widths],
                              config.vae.latent_channels, (side, side))
    batch = random_batch(abstract)
    program = program_lib.build(config, mesh, llm_widths, config.vae.latent_channels,
                                (side, side), shardings_of(abstract))
    step, state = program.step, program.init_state()
    with jax.set_mesh(mesh), sharding.axis_rules(config.mesh.rules):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        print(f"  {attention}: compile + first step {time.perf_counter() - start:.1f} s, "
              f"loss {float(metrics['loss']):.4f}")
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - start)
    return float(np.median(times)), program.model_flops_per_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--remat", default="dots_saveable")
    parser.add_argument("--attention", default="cudnn,xla")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, XLA only, any host")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.steps, args.attention = 2, 2, "xla"
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    chip = hardware.chip(kind)  # None on CPU (--smoke): no MFU.
    peak = chip.bf16_peak_flops if chip else float("nan")
    print(f"device={kind} jax={jax.__version__} peak_bf16_tflops={peak / 1e12:.0f}")
    for attention in args.attention.split(","):
        config = step_config(args)
        seconds, model_flops = measure(config, attention, args.steps)
        images = config.train.batch_size / seconds
        print(f"attention={attention} batch={config.train.batch_size} step_seconds={seconds:.4f} "
              f"images_per_second={images:.1f} mfu={model_flops / seconds / peak:.4f}")


if __name__ == "__main__":
    main()

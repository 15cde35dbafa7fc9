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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import lidit_1b  # noqa: E402
from lidit_jax import hardware  # noqa: E402
from lidit_jax.diffusion import flops as flops_lib  # noqa: E402
from lidit_jax.diffusion.dit import LIDiT  # noqa: E402
from lidit_jax.diffusion.objectives import make_objective  # noqa: E402
from lidit_jax.parallel import mesh as mesh_lib  # noqa: E402
from lidit_jax.parallel import sharding  # noqa: E402
from lidit_jax.train.state import create_train_state, shardings_of  # noqa: E402
from lidit_jax.train.step import jit_train_step, make_train_step  # noqa: E402

def step_config(args):
    config = lidit_1b.get_config()
    config.mesh.data, config.mesh.fsdp = 1, 1
    config.train.batch_size = args.batch
    config.model.remat = args.remat
    if args.smoke:
        config.model.update(depth=2, width=64, heads=2)
        config.text.refiner.heads = config.text.collaborative.heads = 2
        config.text.max_length = 16
        config.text.llms.llama3.width = config.text.llms.qwen.width = 32
        config.data.image_size = 64
    return config


def random_batch(config, llm_widths, seed=0):
    rng = np.random.default_rng(seed)
    b, length = config.train.batch_size, config.text.max_length
    side = config.data.image_size // config.vae.downsample
    lengths = rng.integers(8, length + 1, size=b)
    mask = np.arange(length)[None] < lengths[:, None]
    return {
        "x0": jnp.asarray(rng.normal(size=(b, side, side, config.vae.latent_channels)),
                          jnp.float32),
        "text": {
            "states": [jnp.asarray(rng.normal(size=(b, length, w)), jnp.bfloat16)
                       for w in llm_widths],
            "masks": [jnp.asarray(mask)] * len(llm_widths),
            "prompt_masks": [jnp.asarray(mask & (np.arange(length)[None] >= 4))] * len(llm_widths),
        },
    }


def measure(config, attention, steps):
    """Seconds per train step (median of `steps`) with model.attention = `attention`."""
    config.model.attention = attention
    llm_widths = [config.text.llms[n].width for n in config.text.encoders.split(",")]
    mesh = mesh_lib.build_mesh(config.mesh, jax.devices()[:1])
    constructor = lambda: LIDiT(config, llm_widths, config.vae.latent_channels,  # noqa: E731
                                rngs=nnx.Rngs(0))
    graphdef, state = create_train_state(constructor, config, mesh)
    batch = random_batch(config, llm_widths)
    batch_shardings = jax.tree.map(lambda x: x.sharding, jax.device_put(batch, jax.devices()[0]))
    step = jit_train_step(make_train_step(graphdef, config, make_objective(config.diffusion)),
                          shardings_of(state), batch_shardings, mesh)
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
    return float(np.median(times)), llm_widths


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
        seconds, llm_widths = measure(config, attention, args.steps)
        side = config.data.image_size // config.vae.downsample
        model_flops = flops_lib.train_step_flops(
            config, llm_widths, batch=config.train.batch_size, hw=(side, side),
            text_lengths=[config.text.max_length] * len(llm_widths),
            in_channels=config.vae.latent_channels)
        images = config.train.batch_size / seconds
        print(f"attention={attention} batch={config.train.batch_size} step_seconds={seconds:.4f} "
              f"images_per_second={images:.1f} mfu={model_flops / seconds / peak:.4f}")


if __name__ == "__main__":
    main()

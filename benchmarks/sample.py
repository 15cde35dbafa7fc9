"""Sampling images/s of the demo model: DPM-Solver++(2M), 20 steps, classifier-free guidance.

    python -m benchmarks.sample [--smoke] [--repeats=3]

The demo's LI-DiT (configs/demo_shapes.py, randomly initialised: speed does not depend on the
weights) draws a batch of 8 images (the demo's 4 prompts x 2) from 56-token text states of
width 576, cond and uncond in one batch of 16 per step. The reference is this CPU's measured
float32 matmul peak: the figure is the sampler's model FLOP/s (20 x 2 forwards) over it.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.timing import (  # noqa: E402
    interleaved_seconds, load_average, smoke_and_repeats_main)
from configs import demo_shapes  # noqa: E402
from lidit_jax.diffusion import flops as flops_lib  # noqa: E402
from lidit_jax.diffusion.dit import LIDiT  # noqa: E402
from lidit_jax.diffusion.objectives import make_objective  # noqa: E402
from lidit_jax.parallel import mesh as mesh_lib  # noqa: E402
from lidit_jax import hardware  # noqa: E402
from lidit_jax.diffusion.samplers import make_generate  # noqa: E402

LLM_WIDTH = 576  # SmolLM2-135M, the demo's prompt encoder.


def demo_config(smoke):
    config = demo_shapes.get_config()
    config.diffusion.update(sampler="dpm++2m", sample_steps=2 if smoke else 20)
    if smoke:
        config.model.update(depth=1, width=32, heads=2)
        config.text.refiner.update(depth=1, heads=2)
        config.text.max_length = 8
    return config


def text_states(batch, length, rng):
    lengths = rng.integers(length // 2, length + 1, batch)
    mask = np.arange(length)[None] < lengths[:, None]
    return [{"states": rng.normal(size=(batch, length, LLM_WIDTH)).astype(np.float32),
             "mask": mask, "prompt_mask": mask}]


def run(smoke=False, repeats=3):
    config = demo_config(smoke)
    batch, size = 2 if smoke else 8, config.data.image_size
    length = config.text.max_length
    mesh = mesh_lib.build_mesh(config.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh):
        model = LIDiT(config, [LLM_WIDTH], 3, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    objective = make_objective(config.diffusion)
    generate = make_generate(graphdef, objective, (batch, size, size, 3), config.diffusion)
    rng = np.random.default_rng(0)
    cond, uncond = text_states(batch, length, rng), text_states(1, length, rng)
    key = jax.random.key(0)
    load = load_average()
    seconds = interleaved_seconds(
        {"sample": lambda: generate(params, key, cond, uncond)}, 1 if smoke else repeats)["sample"]
    steps = config.diffusion.sample_steps
    # Model FLOPs: a forward is a third of a train step's; 2 forwards (cond, uncond) per step.
    forward = flops_lib.train_step_flops(config, [LLM_WIDTH], batch=1, hw=(size, size),
                                         text_lengths=[length], in_channels=3) / 3
    flops = steps * 2 * batch * forward
    peak = hardware.measure_cpu_peak_flops()
    return [{
        "model": "smoke" if smoke else "demo_shapes", "sampler": "dpm++2m", "steps": steps,
        "guidance_scale": config.diffusion.guidance_scale, "batch": batch, "image": size,
        "images_per_s": batch / seconds, "seconds_per_batch": seconds,
        "flops_per_s": flops / seconds, "cpu_peak_flops_per_s": peak,
        "fraction_of_peak": flops / seconds / peak, "load_average": load,
    }]


if __name__ == "__main__":
    smoke_and_repeats_main(__doc__, run, "tiny model, one repeat")

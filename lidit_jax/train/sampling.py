"""Samples for fixed prompts from the EMA weights, written as PNG grids and TensorBoard images."""
import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from lidit_jax import paths
from lidit_jax.data.images import to_uint8
from lidit_jax.diffusion import samplers
from lidit_jax.train import metrics as metrics_lib


def make_generate(graphdef, objective, shape, diffusion_config):
    """(params, key, cond, uncond) -> host numpy samples [shape], CFG with the empty prompt.

    The sampler is one jitted program over the run's mesh; its result is gathered from every
    process, so each one holds all samples.
    """

    @jax.jit
    def generate(params, key, cond, uncond):
        model = nnx.merge(graphdef, params)
        return samplers.sample(samplers.denoiser(model), objective, shape, key,
                               sampler=diffusion_config.sampler, steps=diffusion_config.sample_steps,
                               guidance_scale=diffusion_config.guidance_scale, cond=cond,
                               uncond=uncond)

    def generate_on_host(params, key, cond, uncond):
        samples = generate(params, key, cond, uncond)
        return np.asarray(multihost_utils.process_allgather(samples, tiled=True))

    return generate_on_host


def fixed_prompts(config):
    """The prompts the sampler encodes: train.sample_prompts and the empty prompt (guidance's
    unconditional branch). `--mode=encode` stores them in the text cache."""
    return [*config.train.sample_prompts, ""]


class FixedPromptSampler:
    """Encodes `train.sample_prompts` once (`inputs.encode_prompts`: from the text cache where
    `--mode=encode` stored them); `write(step, ema_params, writer)` draws and saves them."""

    def __init__(self, config, graphdef, objective, inputs, mesh):
        self.config = config
        self.inputs = inputs
        prompts = [p for p in config.train.sample_prompts
                   for _ in range(config.train.samples_per_prompt)]
        self.prompts = prompts
        self.cond = inputs.encode_prompts(prompts)
        self.uncond = inputs.encode_prompts([""])
        height, width = inputs.image_hw
        shape = (len(prompts), height, width, inputs.channels)
        self.generate = make_generate(graphdef, objective, shape, config.diffusion)
        self.key = jax.random.key(config.train.sample_seed)

    def images(self, params):
        latents = self.generate(params, self.key, self.cond, self.uncond)
        return to_uint8(self.inputs.image_space.decode(self.inputs.image_space.unscale(latents)))

    def write(self, step, params, writer, directory):
        """Saves DIRECTORY/step_<step>.png (upscaled 4x for viewing) and a TensorBoard image."""
        columns = self.config.train.samples_per_prompt * 2
        grid = metrics_lib.image_grid(self.images(params), columns=columns)
        if jax.process_index() == 0:
            metrics_lib.save_png(paths.path(directory) / f"step_{step:07d}.png", grid, upscale=4)
            writer.write_image(step, "samples", grid)

"""Samples for fixed prompts from the EMA weights, written as PNG grids and TensorBoard images."""
import jax

from lidit_jax import paths
from lidit_jax.data.images import image_grid, save_png, to_uint8
from lidit_jax.diffusion.samplers import make_generate


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
        grid = image_grid(self.images(params), columns=columns)
        if jax.process_index() == 0:
            save_png(paths.path(directory) / f"step_{step:07d}.png", grid, upscale=4)
            writer.write_image(step, "samples", grid)

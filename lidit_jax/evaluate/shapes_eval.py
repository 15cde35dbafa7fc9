"""Shapes prompt following of a trained model: held-out prompts -> images -> scores.

Shared by `--mode=eval --benchmark=shapes`, eval during training and the ablation runner. The
held-out prompts are records of the shapes generator under `eval.seed` (the training records use
`data.shuffle_seed`), in the training layout and size; their metadata is the ground truth.
"""
import jax
import numpy as np

from lidit_jax.data import shapes
from lidit_jax.data.images import to_uint8
from lidit_jax.evaluate import scorer
from lidit_jax.diffusion.samplers import make_generate


def heldout_records(config):
    """The fixed held-out prompt set: eval.num_prompts shapes records (caption, metadata)."""
    source = shapes.ShapesSource(config.eval.num_prompts, config.eval.seed,
                                 config.data.image_size, config.data.shapes_layout)
    return [source[i] for i in range(len(source))]


class ShapesEvaluator:
    """Generates the held-out prompts' images in fixed-shape batches (one compile) and scores them.

    encode_prompts: list of str -> the denoiser's text pytree (replicated host arrays);
    decode: generated [b, h, w, c] (scaled latents or pixels) -> pixels [b, H, W, 3] in [-1, 1].
    """

    def __init__(self, config, graphdef, objective, encode_prompts, decode, latent_hw, channels):
        self.config = config
        self.records = heldout_records(config)
        self.captions = [r["caption"] for r in self.records]
        self.metadatas = [r["metadata"] for r in self.records]
        self.batch = min(config.eval.batch_size, len(self.records))
        self.decode = decode
        self.uncond = encode_prompts([""])
        # Encoded once, now: training may release the LLMs right after building this.
        padded = self.captions + [""] * (-len(self.captions) % self.batch)
        self.cond = [encode_prompts(padded[i:i + self.batch])
                     for i in range(0, len(padded), self.batch)]
        self.generate = make_generate(graphdef, objective,
                                      (self.batch, *latent_hw, channels), config.diffusion)

    def images(self, params):
        """EMA params -> uint8 images [eval.num_prompts, H, W, 3], noise fixed by eval.seed."""
        key = jax.random.key(self.config.eval.seed)
        out = []
        for index, cond in enumerate(self.cond):
            latents = self.generate(params, jax.random.fold_in(key, index), cond, self.uncond)
            out.append(np.asarray(self.decode(latents)))
        pixels = np.concatenate(out)[:len(self.captions)]
        return to_uint8(pixels)

    def evaluate(self, params):
        """-> (scores dict of scorer.score, uint8 images)."""
        images = self.images(params)
        return scorer.score(images, self.metadatas), images

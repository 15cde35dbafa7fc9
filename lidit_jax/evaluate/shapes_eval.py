"""Shapes prompt following of a trained model: held-out prompts -> images -> scores.

Shared by `--mode=eval --benchmark=shapes`, eval during training and the ablation runner. The
held-out prompts are records of the shapes generator under `eval.seed` (the training records use
`data.shuffle_seed`), in the training layout and size; their metadata is the ground truth.

The held-out scenes are deduplicated: no two prompts show one scene, and (training on the shapes
generator, data.source = "shapes") no prompt shows a training record's scene, so the scores
measure composition, not recall. A record whose scene is taken is replaced by the next record of
the same kind (object count and template) after the first eval.num_prompts, which keeps a
design balanced by construction balanced. Where the training set holds every scene of a kind
(e.g. most one-object scenes, a few hundred, among 20000 training records) the record is kept,
marked `seen_in_training` in its metadata, and counted in a warning.
"""
import jax
import numpy as np
from absl import logging

from lidit_jax.data import pipeline, shapes
from lidit_jax.data.images import to_uint8
from lidit_jax.evaluate import scorer
from lidit_jax.diffusion.samplers import make_generate


SPARE_RECORDS = 16  # Replacement candidates per held-out prompt (times eval.num_prompts).


def scene(metadata):
    """A record's scene: its objects as sorted (slot, colour, shape, size), whatever the
    caption's wording or mention order."""
    return tuple(sorted((o["slot"], o["colour"], o["shape"], o["size"])
                        for o in metadata["objects"]))


def _kind(metadata):
    return len(metadata["objects"]), metadata["template"]


def training_scenes(config):
    """The scenes of the training records when they come from the shapes generator
    (data.source = "shapes"); none otherwise (records read from files carry no scene truth)."""
    if config.data.source != "shapes":
        return set()
    source = pipeline.make_source(config.data)
    return {scene(source[i]["metadata"]) for i in range(len(source))}


def heldout_records(config):
    """The fixed held-out prompt set: eval.num_prompts shapes records (caption, metadata) of
    distinct scenes that no training record shows (the module doc)."""
    count = config.eval.num_prompts
    source = shapes.ShapesSource(count * (1 + SPARE_RECORDS), config.eval.seed,
                                 config.data.image_size, config.data.shapes_layout)
    taken = training_scenes(config)
    records, spares, seen = [], {}, 0
    next_spare = count
    for i in range(count):
        record = source[i]
        kind = _kind(record["metadata"])
        # Spares are drawn in index order and kept by kind, so replacements are deterministic.
        while scene(record["metadata"]) in taken:
            while not spares.get(kind) and next_spare < len(source):
                spare = source[next_spare]
                next_spare += 1
                spares.setdefault(_kind(spare["metadata"]), []).append(spare)
            if not spares.get(kind):
                record["metadata"]["seen_in_training"] = True
                seen += 1
                break
            record = spares[kind].pop(0)
        taken.add(scene(record["metadata"]))
        records.append(record)
    if seen:
        logging.warning("shapes eval: %d of %d held-out prompts show a training scene (every "
                        "unseen scene of their kind is used up; a smaller data.shapes_num_records "
                        "leaves more); their metadata says seen_in_training", seen, count)
    return records


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

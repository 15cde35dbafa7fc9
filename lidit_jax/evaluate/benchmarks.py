"""Folders for the official prompt-following scorers: GenEval, T2I-CompBench, DPG-Bench.

The scorers (object detectors, VQA models) need a GPU and their own environments, so lidit_jax
only writes the images in exactly the layout each reads, from the official prompt files shipped
in lidit_jax/evaluate/prompts/ (provenance in its README.md), plus OUT/lidit_metadata.json
(checkpoint step, sampler, steps, guidance, size, seed, images per prompt). Layouts:

  geneval        OUT/<5-digit line index>/metadata.jsonl (that metadata line, verbatim)
                 OUT/<index>/samples/<4-digit image>.png     4 images per prompt
  t2i_compbench  OUT/<category>/samples/<prompt>_<6-digit global index>.png, 10 per prompt,
                 prompt line i -> indices 10 i .. 10 i + 9 (3-in-1 relies on this numbering)
  dpg_bench      OUT/images/<item_id>.png: 4 images tiled 2 x 2 (top left, top right, bottom
                 left, bottom right), side 2 x the image size; nothing else in that folder

As in the reference generators, every prompt starts from the same noise (the seed is reset per
prompt), so image j of every prompt shares its starting noise.
"""
import json
import os

import jax
import numpy as np

from lidit_jax import paths
from lidit_jax.data.images import save_png, to_uint8
from lidit_jax.diffusion.objectives import make_objective
from lidit_jax.diffusion.samplers import make_generate

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
T2I_COMPBENCH_CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex",
                            "numeracy", "3d_spatial")
IMAGES_PER_PROMPT = {"geneval": 4, "t2i_compbench": 10, "dpg_bench": 4}


def geneval_prompts():
    """[(metadata line verbatim, its prompt)] of GenEval's evaluation_metadata.jsonl."""
    with open(os.path.join(PROMPTS_DIR, "geneval", "evaluation_metadata.jsonl"),
              encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    return [(line, json.loads(line)["prompt"]) for line in lines]


def t2i_compbench_prompts(category):
    """The 300 validation prompts of a category (CRLF or LF files: splitlines)."""
    if category not in T2I_COMPBENCH_CATEGORIES:
        raise ValueError(f"T2I-CompBench category {category!r}; known: {T2I_COMPBENCH_CATEGORIES}")
    with open(os.path.join(PROMPTS_DIR, "t2i_compbench", f"{category}_val.txt"),
              encoding="utf-8", newline="") as f:
        return [line for line in f.read().splitlines() if line.strip()]


def dpg_bench_prompts():
    """[(item_id, prompt)] of DPG-Bench, in natural item-id order."""
    with open(os.path.join(PROMPTS_DIR, "dpg_bench", "dpg_bench_prompts.jsonl"),
              encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(row["item_id"], row["prompt"]) for row in rows]


def tile_2x2(images):
    """4 x [S, S, 3] uint8 -> [2S, 2S, 3]: top left, top right, bottom left, bottom right."""
    top = np.concatenate(images[:2], axis=1)
    return np.concatenate([top, np.concatenate(images[2:4], axis=1)], axis=0)


class PromptImages:
    """prompt -> `n` uint8 images [n, H, W, 3] from a trained run's EMA weights; the same
    starting noise for every prompt (one compiled sampler for all)."""

    def __init__(self, config, trained, n, seed, size=None):
        height = width = size or config.data.image_size
        space = trained.image_space
        shape = (n, height // space.downsample, width // space.downsample, space.channels)
        self.generate = make_generate(trained.graphdef, make_objective(config.diffusion), shape,
                                      config.diffusion)
        self.trained, self.n, self.key = trained, n, jax.random.key(seed)
        self.uncond = self._encode([""])

    def _encode(self, texts):
        return [jax.device_get(e.encode(list(texts))) for e in self.trained.encoders]

    def __call__(self, prompt):
        latents = self.generate(self.trained.ema_params, self.key,
                                self._encode([prompt] * self.n), self.uncond)
        space = self.trained.image_space
        pixels = np.asarray(space.decode(space.unscale(latents)))
        return to_uint8(pixels)


def write_geneval(images_of, output, limit=None):
    for index, (line, prompt) in enumerate(geneval_prompts()[:limit]):
        folder = paths.path(output) / f"{index:05d}"
        paths.write_text_atomic(folder / "metadata.jsonl", line + "\n")
        for j, image in enumerate(images_of(prompt)):
            save_png(folder / "samples" / f"{j:04d}.png", image)


def write_t2i_compbench(images_of, output, limit=None, categories=T2I_COMPBENCH_CATEGORIES):
    for category in categories:
        folder = paths.path(output) / category / "samples"
        for i, prompt in enumerate(t2i_compbench_prompts(category)[:limit]):
            images = images_of(prompt)
            for j, image in enumerate(images):
                save_png(folder / f"{prompt}_{len(images) * i + j:06d}.png", image)


def write_dpg_bench(images_of, output, limit=None):
    folder = paths.path(output) / "images"
    for item_id, prompt in dpg_bench_prompts()[:limit]:
        images = images_of(prompt)
        if len(images) != 4:
            raise ValueError(f"DPG-Bench tiles 4 images per prompt, got {len(images)}")
        save_png(folder / f"{item_id}.png", tile_2x2(images))


WRITERS = {"geneval": write_geneval, "t2i_compbench": write_t2i_compbench,
           "dpg_bench": write_dpg_bench}


def write(benchmark, config, trained, output, seed=0, limit=None):
    """Writes BENCHMARK's folder under OUTPUT and OUTPUT/lidit_metadata.json."""
    n = IMAGES_PER_PROMPT[benchmark]
    images_of = PromptImages(config, trained, n, seed)
    metadata = {"benchmark": benchmark, "checkpoint_step": int(trained.step), "seed": seed,
                "images_per_prompt": n, "sampler": config.diffusion.sampler,
                "sample_steps": config.diffusion.sample_steps,
                "guidance_scale": config.diffusion.guidance_scale,
                "size": config.data.image_size, "prompt_limit": limit}
    if jax.process_index() != 0:
        return metadata
    WRITERS[benchmark](images_of, output, limit)
    paths.write_text_atomic(paths.path(output) / "lidit_metadata.json",
                            json.dumps(metadata, indent=1))
    print(f"benchmark={benchmark} output={output} images_per_prompt={n}")
    return metadata

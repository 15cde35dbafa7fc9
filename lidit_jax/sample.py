"""`--mode=sample`: prompts -> PNG images, from the EMA weights of a run's latest checkpoint.

  python -m lidit_jax.main --config=configs/demo_shapes.py --workdir=workdir/demo_shapes \\
      --mode=sample --prompts="a red circle on the left" --prompts="a blue star" \\
      [--prompt_file=prompts.txt] [--output=DIR] [--sampler=euler] [--sample_steps=30] \\
      [--guidance_scale=3] [--seed=0] [--size=32x32] [--num_per_prompt=4]
Flags left unset take the config's values (diffusion.sampler, .sample_steps, .guidance_scale,
data.image_size). Images go to OUTPUT (default WORKDIR/samples/cli) as <index>_<prompt>.png.
"""
import re

import jax
import numpy as np
from absl import flags

from lidit_jax import paths
from lidit_jax.data.images import save_png, to_uint8
from lidit_jax.diffusion.objectives import make_objective
from lidit_jax.inference import apply_sampling_flags, load_trained_run
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.parallel import sharding
from lidit_jax.diffusion.samplers import make_generate

NEEDS_WORKDIR = True
FLAGS = flags.FLAGS


def read_prompts():
    prompts = list(FLAGS.prompts or [])
    if FLAGS.prompt_file:
        text = paths.path(FLAGS.prompt_file).read_text(encoding="utf-8")
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("error: --mode=sample needs --prompts=TEXT (repeatable) or --prompt_file=FILE")
    return prompts


def parse_size(text, default):
    if not text:
        return default, default
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise SystemExit(f"error: --size={text!r} is not HxW, e.g. 32x48")
    return int(match.group(1)), int(match.group(2))


def run(config, workdir):
    prompts = read_prompts()
    apply_sampling_flags(config)
    height, width = parse_size(FLAGS.size, config.data.image_size)
    mesh = mesh_lib.build_mesh(config.mesh)
    trained = load_trained_run(config, workdir, mesh)
    image_space = trained.image_space
    multiple = config.model.patch_size * image_space.downsample
    if height % multiple or width % multiple:
        raise SystemExit(f"error: --size={height}x{width} must be a multiple of {multiple}")

    output = paths.path(FLAGS.output or paths.path(workdir) / "samples" / "cli")
    repeated = [p for p in prompts for _ in range(FLAGS.num_per_prompt)]
    encode = lambda texts: [jax.device_get(e.encode(texts))  # noqa: E731
                            for e in trained.encoders]
    shape = (len(repeated), height // image_space.downsample, width // image_space.downsample,
             image_space.channels)
    generate = make_generate(trained.graphdef, make_objective(config.diffusion), shape,
                             config.diffusion)
    with jax.set_mesh(mesh), sharding.axis_rules(config.mesh.rules):
        latents = generate(trained.ema_params, jax.random.key(FLAGS.seed), encode(repeated),
                           encode([""]))
    images = np.asarray(image_space.decode(image_space.unscale(latents)))
    pixels = to_uint8(images)
    for i, (prompt, image) in enumerate(zip(repeated, pixels)):
        slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60]
        if jax.process_index() == 0:
            save_png(output / f"{i:04d}_{slug}.png", image)
    print(f"samples={len(repeated)} output={output}")

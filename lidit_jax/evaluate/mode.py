"""`--mode=eval`: a trained run's prompt following, or folders for the official benchmarks.

  python -m lidit_jax.main --config=C --workdir=DIR --mode=eval --benchmark=shapes --output=OUT
writes OUT/scores.json (scorer.METRICS with 95 % intervals, num_images, by_mention, step),
OUT/scores.md, OUT/samples.png (the first 32 images) and ends with the line
`prompt_accuracy=<float> num_images=<int>`. The scores use the EMA weights of DIR's newest
checkpoint on eval.num_prompts held-out shapes prompts (eval.seed), sampled with the config's
diffusion.sampler / sample_steps / guidance_scale (the --sampler, --sample_steps and
--guidance_scale flags override them).

  --benchmark=geneval | t2i_compbench | dpg_bench
writes the folder layout the official scorer reads (lidit_jax/evaluate/benchmarks.py).
"""
import io
import json
import os

import jax
import numpy as np
from absl import flags

from lidit_jax import paths
from lidit_jax.data.images import image_grid, save_png
from lidit_jax.diffusion.objectives import make_objective
from lidit_jax.evaluate import scorer
from lidit_jax.evaluate.shapes_eval import ShapesEvaluator
from lidit_jax.inference import apply_sampling_flags, load_trained_run
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.parallel import sharding

NEEDS_WORKDIR = True
FLAGS = flags.FLAGS
BENCHMARKS = ("shapes", "geneval", "t2i_compbench", "dpg_bench")


def encoder_fn(trained):
    return lambda texts: [jax.device_get(e.encode(list(texts)))  # noqa: E731
                          for e in trained.encoders]


def decoder_fn(image_space):
    return lambda latents: image_space.decode(image_space.unscale(latents))  # noqa: E731


def run(config, workdir):
    benchmark = FLAGS.benchmark
    if benchmark not in BENCHMARKS:
        raise SystemExit(f"error: --benchmark={benchmark!r}; choose one of {BENCHMARKS}")
    apply_sampling_flags(config)
    output = FLAGS.output or os.path.join(workdir, "eval", benchmark)
    mesh = mesh_lib.build_mesh(config.mesh)
    trained = load_trained_run(config, workdir, mesh)
    if benchmark != "shapes":
        from lidit_jax.evaluate import benchmarks  # Prompt files only when asked for.
        with jax.set_mesh(mesh), sharding.axis_rules(config.mesh.rules):
            benchmarks.write(benchmark, config, trained, output, seed=FLAGS.seed,
                             limit=config.eval.benchmark_prompts or None)
        return
    scores = shapes_report(config, trained, mesh, output)
    print(f"prompt_accuracy={scores['prompt_accuracy']:.6g} num_images={scores['num_images']}")



def shapes_report(config, trained, mesh, output):
    """Scores `trained` (inference.TrainedRun) on the held-out shapes prompts; writes
    OUTPUT/scores.json, scores.md, samples.png and images.npz (every image, uint8
    [N, S, S, 3] in prompt order, so a changed scorer can re-score without sampling again;
    process 0). Returns the scores dict."""
    if config.data.source != "shapes":
        raise SystemExit("error: --benchmark=shapes scores shapes prompts: set "
                         "--config.data.source=shapes (with data.shapes_layout / image_size)")
    size = config.data.image_size // trained.image_space.downsample
    evaluator = ShapesEvaluator(config, trained.graphdef, make_objective(config.diffusion),
                                encoder_fn(trained), decoder_fn(trained.image_space),
                                (size, size), trained.image_space.channels)
    with jax.set_mesh(mesh), sharding.axis_rules(config.mesh.rules):
        scores, images = evaluator.evaluate(trained.ema_params)
    scores.update(step=trained.step, sampler=config.diffusion.sampler,
                  sample_steps=config.diffusion.sample_steps,
                  guidance_scale=config.diffusion.guidance_scale, eval_seed=config.eval.seed)
    if jax.process_index() == 0:
        output = paths.path(output)
        paths.write_text_atomic(output / "scores.json", json.dumps(scores, indent=1))
        paths.write_text_atomic(output / "scores.md", (
            f"Shapes prompt following, step {trained.step}, {scores['num_images']} held-out "
            f"prompts\n\n" + scorer.markdown_table(scores)))
        buffer = io.BytesIO()
        np.savez_compressed(buffer, images=images)
        (output / "images.npz").write_bytes(buffer.getvalue())
        save_png(output / "samples.png", image_grid(images[:32], columns=8), upscale=2)
    return scores

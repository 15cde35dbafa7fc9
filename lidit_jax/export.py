"""`--mode=export`: the EMA weights of a run's newest checkpoint as one safetensors file.

  python -m lidit_jax.main --config=configs/demo_shapes.py --workdir=DIR --mode=export \\
      [--output=FILE]
Writes FILE (default WORKDIR/export/lidit_ema_step<N>.safetensors): one float32 tensor per
trainable parameter (DiT and refiners; the frozen LLMs are not in it), named by its module path
(`dit.blocks.mlp.fc1.kernel`; scanned blocks stacked on axis 0 as in training), and in the
header metadata the step, the config as JSON and the frozen encoders' fingerprints, so the
weights can be used outside lidit_jax (safetensors has readers for PyTorch, NumPy and Rust).
The last line printed is `export=<file> params=<int>`. The file format, and `load_exported(file,
model)` that puts the weights back into an `LIDiT` built from the same config, are in
lidit_jax/train/ema_safetensors.py.
"""
import json

from absl import flags

from lidit_jax import paths
from lidit_jax.inference import load_trained_run
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.train.checkpoint import encoder_fingerprints
from lidit_jax.train.ema_safetensors import FORMAT, export_params

NEEDS_WORKDIR = True


def run(config, workdir):
    mesh = mesh_lib.build_mesh(config.mesh)
    trained = load_trained_run(config, workdir, mesh)
    path = paths.path(flags.FLAGS.output or paths.path(workdir) / "export"
                      / f"lidit_ema_step{trained.step}.safetensors")
    fingerprints = encoder_fingerprints(trained.encoders, trained.image_space)
    count = export_params(trained.ema_params, path, {
        "format": FORMAT, "step": trained.step, "config": config.to_json_best_effort(),
        "fingerprints": json.dumps(fingerprints)})
    print(f"export={path} params={count}")

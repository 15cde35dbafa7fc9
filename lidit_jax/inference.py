"""A trained run, ready for inference: its EMA weights, frozen encoders and image space.

Used by `--mode=sample` and `--mode=export`; the checkpoint's encoder fingerprints are checked
against the config's, as a training resume does. Only the EMA weights are restored.
"""
import dataclasses

from absl import flags, logging
from flax import nnx

from lidit_jax import paths
from lidit_jax.text import features
from lidit_jax.diffusion.vae import make_image_space
from lidit_jax.text.encoder import PromptEncoder
from lidit_jax.train import checkpoint as checkpoint_lib
from lidit_jax.train.program import abstract_model


@dataclasses.dataclass
class TrainedRun:
    step: int
    graphdef: nnx.GraphDef
    ema_params: nnx.State  # Sharded over the mesh given to `load_trained_run`.
    encoders: list
    image_space: object


def load_trained_run(config, workdir, mesh):
    """The newest checkpoint of WORKDIR; SystemExit with a clear message when there is none."""
    encoders = [PromptEncoder.from_config(config, name)
                for name in features.encoder_names(config.text)]
    image_space = make_image_space(config.vae)
    widths = [e.width for e in encoders]
    model = abstract_model(config, mesh, widths, image_space.channels)
    graphdef, abstract = model.graphdef, model.abstract_state
    # Only the EMA weights are read: parameters and optimizer moments never reach the devices.
    restored = checkpoint_lib.Checkpointer(workdir, config.checkpoint).restore_latest(
        checkpoint_lib.ema_only(abstract), checkpoint_lib.encoder_fingerprints(encoders, image_space),
        allow_mismatch=config.text.allow_fingerprint_mismatch)
    if restored is None:
        raise SystemExit(f"error: no checkpoint in {paths.path(workdir) / 'checkpoints'}; "
                         "train first")
    step, state, _, _ = restored
    logging.info("using the EMA weights of step %d", step)
    return TrainedRun(step, graphdef, state["ema_params"], encoders, image_space)


def apply_sampling_flags(config):
    """--sampler / --sample_steps / --guidance_scale of the sample and eval modes, where given,
    override config.diffusion."""
    diffusion = config.diffusion
    with diffusion.unlocked():
        diffusion.sampler = flags.FLAGS.sampler or diffusion.sampler
        diffusion.sample_steps = flags.FLAGS.sample_steps or diffusion.sample_steps
        if flags.FLAGS.guidance_scale is not None:
            diffusion.guidance_scale = flags.FLAGS.guidance_scale

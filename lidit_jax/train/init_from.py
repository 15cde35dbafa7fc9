"""`train.init_from`: a new run starts from another run's weights (e.g. the 1024 px fine-tune
of a 512 px run), not from its optimizer state or data position.

train.init_from is either
  - a run's workdir (its newest checkpoint; the frozen encoders' fingerprints are checked as on
    resume): params <- its params, EMA <- its EMA when train.init_from_ema, else the params;
  - an exported EMA file (`--mode=export`, *.safetensors): params and EMA <- its weights.
The optimizer state, step (0), RNG and data position stay those of the new run. A run that
already has checkpoints resumes from them instead (init_from only seeds step 0).
"""
import jax
from absl import logging
from flax import nnx

from lidit_jax.train import checkpoint as checkpoint_lib
from lidit_jax.train.ema_safetensors import load_exported


def _like(source, target):
    """Source parameters put in the target's shardings and dtypes."""
    return jax.tree.map(lambda s, t: jax.device_put(s.astype(t.dtype), t.sharding), source,
                        target)


def initialize(state, graphdef, config, fingerprints):
    """Returns `state` with params / EMA from config.train.init_from (see the module doc)."""
    path = config.train.init_from
    if path.endswith(".safetensors"):
        model = nnx.merge(graphdef, state.params)
        metadata = load_exported(path, model)
        params = _like(nnx.state(model, nnx.Param), state.params)
        logging.info("init_from: EMA weights of step %s from %s", metadata.get("step"), path)
        return state.replace(params=params, ema_params=params)
    restored = checkpoint_lib.Checkpointer(path, config.checkpoint).restore_latest(
        checkpoint_lib.abstract_like(state), fingerprints,
        allow_mismatch=config.text.allow_fingerprint_mismatch)
    if restored is None:
        raise ValueError(f"train.init_from={path!r}: no checkpoint in {path}/checkpoints and "
                         "not a .safetensors export; give a run's workdir or an exported file")
    step, source, _, _ = restored
    ema = source.ema_params if config.train.init_from_ema else source.params
    logging.info("init_from: step %d of %s (EMA %s)", step, path,
                 "from its EMA" if config.train.init_from_ema else "= its params")
    return state.replace(params=_like(source.params, state.params),
                         ema_params=_like(ema, state.ema_params))

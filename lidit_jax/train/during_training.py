"""Eval during training (eval.every steps): shapes scores and a fixed-noise validation loss.

  scores   the shapes scorer on the eval.num_prompts held-out prompts (ShapesEvaluator), from
           the EMA weights; only for data.source=shapes
  val_loss the objective's loss of the EMA weights on eval.val_records records at each fixed
           timestep of eval.val_timesteps (fractions of the noise range: DDPM step
           round(f * (T - 1)), flow time f), with noise fixed by eval.seed: the MLPerf
           text-to-image protocol, so two calls on the same weights give the same number and a
           change between evaluations is the model's. The records are held out for shapes data
           (the generator under eval.seed + 1); other sources use their first eval.val_records
           records (part of the training set: a fit measure, not generalisation).
Both go to TensorBoard and metrics.jsonl as eval/<metric> and eval/val_loss[_t<f>].
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lidit_jax.data import pipeline
from lidit_jax.evaluate.shapes_eval import ShapesEvaluator, heldout_records
from lidit_jax.evaluate.scorer import METRICS


def validation_records(config):
    """(images uint8 [n, S, S, 3], captions) of the validation-loss records."""
    data = config.data.copy_and_resolve_references()
    if data.source == "shapes":
        with data.unlocked():
            data.shuffle_seed = config.eval.seed + 1
            data.shapes_num_records = config.eval.val_records
    source = pipeline.make_source(data)
    if len(source) < config.eval.val_records:
        raise ValueError(f"eval.val_records={config.eval.val_records} but the data has "
                         f"{len(source)} records")
    records = [source[i] for i in range(config.eval.val_records)]
    return np.stack([r["image"] for r in records]), [r["caption"] for r in records]


def fixed_prompts(config):
    """The prompts `TrainingEval` encodes (none with eval.every = 0): the shapes held-out
    prompts and the empty one (guidance), and the validation records' captions.
    `--mode=encode` stores them in the text cache."""
    if not config.eval.every:
        return []
    prompts = []
    if config.data.source == "shapes":
        prompts = [record["caption"] for record in heldout_records(config)] + [""]
    return prompts + validation_records(config)[1]


def fixed_times(objective, fractions):
    """eval.val_timesteps fractions -> the objective's t values (int32 steps or float times)."""
    fractions = np.asarray(fractions, np.float32)
    if hasattr(objective, "num_timesteps"):
        return np.round(fractions * (objective.num_timesteps - 1)).astype(np.int32)
    return fractions


def make_validation_loss(graphdef, objective):
    """(params, x0 [n, h, w, c], noise [n, h, w, c], text, t scalar) -> mean loss (jitted)."""

    @jax.jit
    def loss(params, x0, noise, text, t):
        model = nnx.merge(graphdef, params)
        ts = jnp.full((x0.shape[0],), t)
        prediction = model(objective.noisy(x0, noise, ts), objective.model_time(ts), text)
        return jnp.mean(objective.loss(prediction, objective.target(x0, noise, ts)))

    return loss


class TrainingEval:
    """Built once before the loop (prompts encoded, from the text cache where `--mode=encode`
    stored them: `fixed_prompts`; records fixed); `write` per evaluation."""

    def __init__(self, config, graphdef, objective, inputs):
        self.config = config
        self.shapes = None
        if config.data.source == "shapes":
            self.shapes = ShapesEvaluator(
                config, graphdef, objective, inputs.encode_prompts,
                lambda z: inputs.image_space.decode(inputs.image_space.unscale(z)),
                inputs.image_hw, inputs.channels)
        images, captions = validation_records(config)
        self.x0 = np.asarray(inputs.image_space.scale(inputs.image_space.encode(images)))
        self.text = inputs.encode_prompts(captions)
        self.noise = np.asarray(jax.random.normal(jax.random.key(config.eval.seed),
                                                  self.x0.shape, jnp.float32))
        self.fractions = tuple(config.eval.val_timesteps)
        self.times = fixed_times(objective, self.fractions)
        self.loss = make_validation_loss(graphdef, objective)

    def validation_losses(self, params):
        """{f"val_loss_t{f}": loss at each fixed timestep, "val_loss": their mean}."""
        out = {f"val_loss_t{f:g}": float(self.loss(params, self.x0, self.noise, self.text, t))
               for f, t in zip(self.fractions, self.times)}
        out["val_loss"] = float(np.mean(list(out.values())))
        return out

    def write(self, step, params, writer):
        scalars = self.validation_losses(params)
        if self.shapes is not None:
            scores, _ = self.shapes.evaluate(params)
            scalars.update({name: scores[name] for name in METRICS})
        writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
        return scalars

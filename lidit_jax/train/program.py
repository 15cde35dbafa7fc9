"""The train program, built one way for the loop, `--mode=compile`, inference and the benchmarks:
the denoiser's constructor, its abstract train state (shapes and shardings, nothing allocated),
the objective, the jitted step and its model FLOPs.

    program = build(config, mesh, llm_widths, channels, image_hw, batch_shardings)
    state = program.init_state()                       # or restore into program.abstract_state
    state, metrics = program.step(state, batch)        # + encoder params when the LLMs run in it
"""
import dataclasses
from typing import Any, Callable

from flax import nnx

from lidit_jax.diffusion.dit import LIDiT
from lidit_jax.diffusion.flops import train_step_flops
from lidit_jax.diffusion.objectives import make_objective
from lidit_jax.text.in_step import encoder_flops
from lidit_jax.train.state import abstract_train_state, init_train_state, shardings_of
from lidit_jax.train.step import jit_train_step, make_train_step


@dataclasses.dataclass(frozen=True)
class AbstractModel:
    """The denoiser of a config and its train state's shapes and shardings, nothing allocated:
    what inference restores into and the train program is built on."""
    constructor: Callable[[], LIDiT]  # Builds the LIDiT (with config.seed's initialisation).
    graphdef: nnx.GraphDef
    abstract_state: Any  # train.state.TrainState of ShapeDtypeStructs with their shardings.
    config: Any
    mesh: Any

    def init_state(self):
        """A fresh train state, created directly in its shards."""
        return init_train_state(self.constructor, self.config, self.mesh, self.abstract_state)


def abstract_model(config, mesh, llm_widths, channels):
    """The LIDiT for text states of `llm_widths` and images of `channels`, and its train state's
    shapes and shardings over `mesh` (`train.state.abstract_train_state`)."""
    def constructor():
        return LIDiT(config, llm_widths, channels, rngs=nnx.Rngs(config.seed))

    graphdef, abstract = abstract_train_state(constructor, config, mesh)
    return AbstractModel(constructor, graphdef, abstract, config, mesh)


@dataclasses.dataclass(frozen=True)
class TrainProgram(AbstractModel):
    objective: Any
    step: Callable  # jitted (state, batch[, encoder_params]) -> (state, metrics); state donated.
    model_flops_per_step: float  # What the logged MFU counts (the function below).


def model_flops_per_step(config, llm_widths, channels, image_hw, encoder_params=None):
    """Model FLOPs of one train step on global batches of `image_hw` x `channels`: the DiT and
    refiners forward and backward (`diffusion.flops.train_step_flops`), plus, with
    `encoder_params` (the frozen encoders' weights and prefix caches, concrete or abstract), their
    forward in the step (`in_step.encoder_flops`), all at text.max_length. The one count of the
    trainer's logged MFU and `--mode=compile`'s report (`aot_cost.speed_report`)."""
    flops = train_step_flops(config, llm_widths, batch=config.train.batch_size, hw=image_hw,
                             text_lengths=[config.text.max_length] * len(llm_widths),
                             in_channels=channels)
    if encoder_params is not None:
        flops += encoder_flops(encoder_params, config.train.batch_size, config.text.max_length)
    return flops


def build(config, mesh, llm_widths, channels, image_hw, batch_shardings, text_encoders=None,
          encoder_params=None):
    """The train program for global batches of `image_hw` latents (or pixels) with `channels`,
    sharded as `batch_shardings`. With `text_encoders` (in_step.TextEncoders) the frozen LLMs run
    inside the step on `encoder_params` (their weights and prefix caches, concrete or abstract
    with shardings), and their forward counts in the model FLOPs."""
    model = abstract_model(config, mesh, llm_widths, channels)
    objective = make_objective(config.diffusion)
    step = jit_train_step(make_train_step(model.graphdef, config, objective, text_encoders),
                          shardings_of(model.abstract_state), batch_shardings, mesh,
                          None if encoder_params is None else shardings_of(encoder_params))
    flops = model_flops_per_step(config, llm_widths, channels, image_hw, encoder_params)
    return TrainProgram(**vars(model), objective=objective, step=step, model_flops_per_step=flops)

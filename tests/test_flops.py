"""The train-step FLOP count against XLA's cost analysis of the compiled gradient (within 10 %).

XLA's cost analysis counts a while loop's body once, not once per trip, so the models here are
built with scan_layers=False (a python loop over blocks) to make XLA see every layer.
"""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import common
from lidit_jax.diffusion import dit, flops


def small_config(**text):
    c = common.get_config()
    c.model.update(depth=2, width=128, heads=4, dtype="float32", scan_layers=False)
    c.text.update(text)
    return c


def xla_flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]


@pytest.mark.parametrize("encoders,widths,lengths", [
    pytest.param("smollm2,gemma3", [48, 40], [12, 10], marks=pytest.mark.slow),
    ("smollm2", [48], [12])])
def test_train_step_flops_match_xla(encoders, widths, lengths):
    """The whole LIDiT (timestep embedder, token + collaborative refiners, DiT), jit(grad);
    with one LLM the collaborative blocks have no cross-attention."""
    config = small_config(fusion="collaborative", encoders=encoders)
    batch, hw, channels = 2, (24, 16), 3
    model = dit.LIDiT(config, widths, channels, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    x = jnp.ones((batch, *hw, channels))
    t = jnp.full((batch,), 500.0)
    text = [{"states": jnp.ones((batch, n, w)), "mask": jnp.ones((batch, n), bool),
             "prompt_mask": jnp.ones((batch, n), bool)} for n, w in zip(lengths, widths)]

    def loss(params):
        return jnp.sum(jnp.square(nnx.merge(graphdef, params)(x, t, text)))

    measured = xla_flops(jax.grad(loss), params)
    ours = flops.train_step_flops(config, widths, batch=batch, hw=hw, text_lengths=lengths,
                                  in_channels=channels)
    assert abs(ours / measured - 1) < 0.1, (ours, measured)


def test_flops_scale_with_batch_and_resolution():
    config = common.get_config()
    args = dict(llm_widths=[576], hw=(32, 32), text_lengths=[128], in_channels=3)
    one = flops.train_step_flops(config, batch=1, **args)
    assert flops.train_step_flops(config, batch=8, **args) == 8 * one
    assert flops.train_step_flops(config, batch=1, **{**args, "hw": (64, 64)}) > 3 * one

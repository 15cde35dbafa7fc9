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
from lidit_jax.nn.layers import TimestepEmbedder


def small_config(**text):
    c = common.get_config()
    c.model.update(depth=2, width=128, heads=4, dtype="float32", scan_layers=False)
    c.text.update(text)
    return c


def xla_flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]


def test_dit_backbone_flops_match_xla():
    config = small_config()
    batch, hw, channels, context_len = 2, (32, 24), 4, 24
    backbone = dit.DiTBackbone(config.model, channels, rngs=nnx.Rngs(0))
    time_embed = TimestepEmbedder(config.model.width, rngs=nnx.Rngs(1))
    graphdefs, params = zip(nnx.split(backbone), nnx.split(time_embed))
    x = jnp.ones((batch, *hw, channels))
    context = jnp.ones((batch, context_len, config.model.width))
    mask = jnp.ones((batch, context_len), bool)

    def loss(params):
        backbone, time_embed = (nnx.merge(g, p) for g, p in zip(graphdefs, params))
        c = time_embed(jnp.full((batch,), 500.0))
        return jnp.sum(jnp.square(backbone(x, c, context, mask)))

    measured = xla_flops(jax.grad(loss), params)
    ours = 3 * batch * flops.dit_forward_flops(config.model, channels, hw, context_len)
    assert abs(ours / measured - 1) < 0.1, (ours, measured)


def test_flops_scale_with_batch_and_resolution():
    config = common.get_config()
    args = dict(llm_widths=[576], hw=(32, 32), text_lengths=[128], in_channels=3)
    one = flops.train_step_flops(config, batch=1, **args)
    assert flops.train_step_flops(config, batch=8, **args) == 8 * one
    assert flops.train_step_flops(config, batch=1, **{**args, "hw": (64, 64)}) > 3 * one

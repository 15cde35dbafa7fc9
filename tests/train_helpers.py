"""Shared pieces for the training tests: a tiny config, random text states, meshes."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from lidit_jax.parallel import mesh as mesh_lib

LLM_WIDTH = 24
TEXT_LEN = 8


def tiny_config(**train):
    config = common.get_config()
    config.model.depth, config.model.width, config.model.heads = 2, 32, 2
    config.model.dtype = "float32"
    config.text.max_length = TEXT_LEN
    config.text.refiner.depth, config.text.refiner.heads = 1, 2
    config.text.collaborative.heads = 2
    config.data.image_size = 8
    config.diffusion.objective = "flow"
    config.train.batch_size = 32
    config.train.warmup_steps = 0
    config.train.learning_rate = 1e-3
    config.train.ema_decay = 0.9
    config.mesh.replicated_min_size = 1 << 40
    for key, value in train.items():
        config.train[key] = value
    return config


def random_batch(seed, batch=32, size=8):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, TEXT_LEN + 1, size=batch)
    mask = np.arange(TEXT_LEN)[None] < lengths[:, None]
    prompt_mask = mask & (np.arange(TEXT_LEN)[None] >= 1)
    return {
        "x0": jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32),
        "text": {"states": [jnp.asarray(rng.normal(size=(batch, TEXT_LEN, LLM_WIDTH)), jnp.bfloat16)],
                 "masks": [jnp.asarray(mask)], "prompt_masks": [jnp.asarray(prompt_mask)]},
    }


def make_mesh(data, fsdp, tensor, context=1):
    devices = jax.devices()[: data * fsdp * context * tensor]
    return jax.sharding.Mesh(np.array(devices).reshape(data, fsdp, context, tensor),
                             mesh_lib.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)

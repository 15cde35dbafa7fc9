"""The position-embedding measurement (docs/denoiser.md): the demo as shipped before the change
(configs/demo_shapes.py's data, encoder, DiT and budget; the ResBlock, a constant learning rate
and guidance 3 were its settings), one arm per `model.position_embedding`, scored on 256
held-out prompts.

  python -m lidit_jax.evaluate.ablation --configs_dir=configs/position \\
      --arms=resblock,sincos,rope,resblock_sincos --seeds=3 --workdir=DIR
"""
from configs import demo_shapes


def get_config(position_embedding):
    c = demo_shapes.get_config()
    c.model.position_embedding = position_embedding
    c.train.lr_schedule = "constant"
    c.diffusion.guidance_scale = 3.0
    c.train.steps = 1200
    c.train.sample_every = 1200
    c.eval.num_prompts = 256
    return c

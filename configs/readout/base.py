"""What every readout arm shares (lidit_jax/evaluate/readout.py): SmolLM2-135M-Instruct's last
layer, no instruction, no chat template, no refiner (projection only) into a conditioner of
width 128. Each arm (a file next to this one) changes its text side only.

  python -m lidit_jax.evaluate.readout --arms=raw,lidit,causal_refiner,minilm --seeds=5 \\
      --output=DIR [--readout=mentions] [--steps=1500]
Only `text.*`, `model.width` / `model.dtype` and (scratch arms) `scratch_lm` are read; the
decoder and its training budget are the readout's own flags.
"""
from configs import common


def get_config():
    c = common.get_config()
    c.text.encoders = "smollm2"
    c.text.fusion = "single"
    c.text.use_instruction = False
    c.text.use_chat_template = False
    # The longest readout caption is 33 words (~45 SmolLM2 tokens); instruction + SmolLM2's
    # chat template (with its default system prompt) add ~50 (the instruction arms set 112).
    c.text.max_length = 64
    c.text.llms.smollm2.layer = -1
    c.text.llms.smollm2.dtype = "float32"  # CPUs have no fast bf16 matmul; states are cached.
    c.text.refiner.depth = 0
    c.text.refiner.heads = 4
    c.model.width = 128
    c.model.dtype = "float32"
    return c

"""Generative arm: SmolLM2 with the paper's instruction in its chat template, then the
bidirectional token refiner (depth 2, gated). No pooled text, as every arm."""
from configs.generative import base


def get_config(arg=None):
    del arg
    c = base.get_config()
    c.text.use_instruction = True
    c.text.use_chat_template = True
    # Chat template (its default system prompt), instruction and the longest caption:
    c.text.max_length = 96  # Measured: the longest caption takes 93 tokens.
    c.text.refiner.depth = 2
    return c

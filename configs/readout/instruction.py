"""Readout arm: `raw` + the paper's instruction, inside SmolLM2's chat template (as the instruct
model was tuned to read it)."""
from configs.readout import base


def get_config(arg=None):
    del arg
    c = base.get_config()
    c.text.use_instruction = True
    c.text.use_chat_template = True
    c.text.max_length = 112
    return c

"""Ablation arm: baseline + the paper's instruction before every caption."""
from configs.ablations import base


def get_config(arg=None):
    del arg
    c = base.get_config()
    c.text.use_instruction = True
    return c

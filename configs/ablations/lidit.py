"""Ablation arm: LI-DiT with one LLM, instruction + token refiner (the paper's "both")."""
from configs.ablations import base


def get_config(arg=None):
    del arg
    c = base.get_config()
    c.text.use_instruction = True
    c.text.refiner.depth = 2
    c.model.pooled_text = True
    return c

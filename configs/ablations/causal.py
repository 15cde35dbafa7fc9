"""Ablation arm: LI-DiT (one LLM) with the refiner's causal mask kept."""
from configs.ablations import lidit


def get_config(arg=None):
    del arg
    c = lidit.get_config()
    c.text.refiner.causal = True
    return c

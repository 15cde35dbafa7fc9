"""Ablation arm: LI-DiT (one LLM) fed from the third-to-last layer (the paper's choice) instead
of the last."""
from configs.ablations import lidit


def get_config(arg=None):
    del arg
    c = lidit.get_config()
    c.text.llms.smollm2.layer = -3
    return c

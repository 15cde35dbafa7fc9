"""Ablation arm: two LLMs fused by concatenation (token refiners, no collaborative block)."""
from configs.ablations import lidit


def get_config(arg=None):
    del arg
    c = lidit.get_config()
    c.text.encoders = "smollm2,gemma3"
    c.text.fusion = "concat"
    return c

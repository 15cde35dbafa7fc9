"""Ablation arm: the `collaborative` arm's two LLMs fused by concatenation instead (token
refiners, no collaborative block): the paper's concat vs collaborative comparison."""
from configs.ablations import collaborative


def get_config(arg=None):
    del arg
    c = collaborative.get_config()
    c.text.fusion = "concat"
    return c

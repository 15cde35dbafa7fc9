"""Ablation arm: the paper's baseline, SmolLM2's last layer straight into cross-attention
(no instruction, no refiner, no pooled text)."""
from configs.ablations import base


def get_config(arg=None):
    del arg
    return base.get_config()

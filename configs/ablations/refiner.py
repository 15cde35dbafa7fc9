"""Ablation arm: baseline + the linguistic token refiner (depth 2, gated, bidirectional), whose
pooled text vector also joins adaLN as in LI-DiT."""
from configs.ablations import base


def get_config(arg=None):
    del arg
    c = base.get_config()
    c.text.refiner.depth = 2
    c.model.pooled_text = True
    return c

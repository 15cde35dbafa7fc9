"""Ablation arm: LI-DiT with a second LLM (SmolLM2 + Gemma 3 270M) and the collaborative
refiner."""
from configs.ablations import lidit


def get_config(arg=None):
    del arg
    c = lidit.get_config()
    c.text.encoders = "smollm2,gemma3"
    c.text.fusion = "collaborative"
    return c

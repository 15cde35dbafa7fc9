"""Generative arm: `lidit` with the refiner's causal mask kept (text.refiner.causal)."""
from configs.generative import lidit


def get_config(arg=None):
    del arg
    c = lidit.get_config()
    c.text.refiner.causal = True
    return c

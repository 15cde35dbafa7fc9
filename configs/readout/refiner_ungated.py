"""Readout arm: `refiner` without its gates (text.refiner.gating=False, plain residuals): the
bidirectional twin of `refiner_causal_ungated`. The gates' condition is the whole caption's
mean, a path from later words into every token whatever the attention mask, so only the
ungated pair isolates the mask."""
from configs.readout import refiner


def get_config(arg=None):
    del arg
    c = refiner.get_config()
    c.text.refiner.gating = False
    return c

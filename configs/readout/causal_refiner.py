"""Readout arm: `lidit` with the refiner's causal mask (text.refiner.causal): the one switch that
decides whether refinement can move later words into earlier tokens."""
from configs.readout import lidit


def get_config(arg=None):
    del arg
    c = lidit.get_config()
    c.text.refiner.causal = True
    return c

"""Readout arm: `refiner` with the refiner's causal mask (text.refiner.causal): the one switch
that decides whether refinement can move later words into earlier tokens, without `lidit`'s
instruction and chat template (which add ~60 tokens the refiner runs over: 2-3x its CPU time)."""
from configs.readout import refiner


def get_config(arg=None):
    del arg
    c = refiner.get_config()
    c.text.refiner.causal = True
    return c

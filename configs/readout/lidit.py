"""Readout arm: LI-DiT's text side, `instruction` + the bidirectional token refiner."""
from configs.readout import instruction


def get_config(arg=None):
    del arg
    c = instruction.get_config()
    c.text.refiner.depth = 2
    return c

"""Readout arm: `raw` + the bidirectional linguistic token refiner (depth 2, gated)."""
from configs.readout import base


def get_config(arg=None):
    del arg
    c = base.get_config()
    c.text.refiner.depth = 2
    return c

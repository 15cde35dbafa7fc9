"""Readout arm: `raw` fed from the third-to-last layer (the paper's choice) instead of the last."""
from configs.readout import base


def get_config(arg=None):
    del arg
    c = base.get_config()
    c.text.llms.smollm2.layer = -3
    return c

"""Readout arm: a bidirectional encoder (MiniLM-L6, its last layer) with projection only, as
`raw` (the stand-in for the paper's T5)."""
from configs.readout import base


def get_config(arg=None):
    del arg
    c = base.get_config()
    c.text.encoders = "minilm"
    return c

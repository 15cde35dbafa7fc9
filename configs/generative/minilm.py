"""Generative arm: MiniLM-L6's last layer (bidirectional), plain caption, projection only."""
from configs.generative import base


def get_config(arg=None):
    del arg
    c = base.get_config()
    c.text.encoders = "minilm"
    return c

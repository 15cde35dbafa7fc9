"""Generative arm (the baseline): SmolLM2's last layer, plain caption, projection only."""
from configs.generative import base


def get_config(arg=None):
    del arg
    return base.get_config()

"""Readout arm: the chosen LLM layer (SmolLM2's last) with its projection only (no refiner)."""
from configs.readout import base


def get_config(arg=None):
    del arg
    return base.get_config()

"""Readout arm: `refiner_ungated` with the causal mask: a strictly causal refiner (no gate sees
a later word), the arm the paper's "causal refiner" ablation means."""
from configs.readout import refiner_ungated


def get_config(arg=None):
    del arg
    c = refiner_ungated.get_config()
    c.text.refiner.causal = True
    return c

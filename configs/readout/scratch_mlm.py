"""Readout arm: `scratch_causal`'s model trained as a bidirectional masked-LM instead
(lidit_jax/evaluate/scratch_lm.py): the objective with its attention mask is the one switch."""
from configs.readout import scratch_causal


def get_config(arg=None):
    del arg
    c = scratch_causal.get_config()
    c.scratch_lm = "mlm"
    return c

"""Readout arm: a small transformer trained here from scratch on the readout's training
captions with next-token prediction under a causal mask (lidit_jax/evaluate/scratch_lm.py), its
last layer with projection only, as `raw`. The twin of `scratch_mlm`: same model, tokenizer,
data, steps."""
from configs.readout import base


def get_config(arg=None):
    del arg
    c = base.get_config()
    # Read by readout.py only: the text states come from scratch_lm, not from text.llms (the
    # text.* settings other than the refiner's are then unused).
    c.scratch_lm = "causal"
    return c

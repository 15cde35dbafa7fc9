"""Ablation arm: a bidirectional encoder baseline (the stand-in for the paper's T5): MiniLM's last
layer straight into cross-attention, no instruction, no refiner, as `baseline`.

Needs the BERT encoder family (`text.llms.minilm`, from the text-encoder work of issue 17); on a
tree without it, validation names the missing `text.llms` entry.
"""
from configs.ablations import base


def get_config(arg=None):
    del arg
    c = base.get_config()
    c.text.encoders = "minilm"
    return c

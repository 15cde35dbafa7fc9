"""Frozen text encoders (decoder-only LLMs, BERT, T5): `load_llm(path)` -> `LLM` (other text
modules: import by path)."""
from lidit_jax.text.decoder import LLMConfig
from lidit_jax.text.llm import LLM
from lidit_jax.text.weights import load_llm

__all__ = ["load_llm", "LLM", "LLMConfig"]

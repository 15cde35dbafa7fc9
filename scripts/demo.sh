#!/usr/bin/env bash
# The CPU demo: installs lidit_jax and the offline models, then trains a small LI-DiT on generated
# shapes data with SmolLM2-135M-Instruct as the prompt encoder (text states cached first), writes
# samples for fixed prompts, then scores the trained model on held-out prompts (colour, shape and
# position accuracy; the last line is `prompt_accuracy=<float> num_images=<int>`). Extra
# arguments go to every step, e.g. --config.train.steps=200.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WORKDIR="${WORKDIR:-workdir/demo_shapes}"
# --no-compile: Python byte-compiles the few modules a run imports on first import; compiling
# every installed file up front took a third of a fresh install (docs/performance.md, "The test
# suite").
"$PYTHON" -m pip install --quiet --progress-bar off --no-compile -e .
PYTHON="$PYTHON" bash scripts/install_models.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
"$PYTHON" -m lidit_jax.main --config=configs/demo_shapes.py --workdir="$WORKDIR" --mode=encode "$@"
"$PYTHON" -m lidit_jax.main --config=configs/demo_shapes.py --workdir="$WORKDIR" --mode=train "$@"
echo "samples: $WORKDIR/samples/  metrics: $WORKDIR/metrics.jsonl  tensorboard: $WORKDIR/tensorboard"
echo "held-out scores: $WORKDIR/eval/shapes/scores.md"
"$PYTHON" -m lidit_jax.main --config=configs/demo_shapes.py --workdir="$WORKDIR" --mode=eval \
    --benchmark=shapes "$@"

#!/usr/bin/env bash
# Installs lidit_jax with its test extras and the offline models, then runs the whole test suite
# on CPU (8 fake devices, set by tests/conftest.py), both tiers: `-m "slow or not slow"` replaces
# pytest.ini's fast-tier default `-m "not slow"`. This is the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install --quiet --progress-bar off --no-compile -e '.[test]' # As demo.sh.
PYTHON="$PYTHON" bash scripts/install_models.sh
"$PYTHON" -m pytest -q -n 2 --dist worksteal --durations=15 -m "slow or not slow" "$@"

"""lidit_jax's benchmarks against reference implementations: `python -m benchmarks.run`."""

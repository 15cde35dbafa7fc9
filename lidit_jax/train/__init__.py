"""Training: state, sharded train step, loop, checkpoints, metrics."""

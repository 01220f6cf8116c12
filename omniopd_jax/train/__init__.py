"""The training system: setup, loop, jitted update step, checkpoints and metrics."""

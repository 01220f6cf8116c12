"""Experiments built on the training system (`python -m omniopd_jax.experiments.compare`)."""

"""omniopd_jax: logit-free, chunk-level on-policy distillation (OmniOPD) in JAX/Flax."""

__version__ = "0.1.0"
